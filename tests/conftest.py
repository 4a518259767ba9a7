"""Test setup shared by every test.

* Without a CUDA GPU, ``TRITON_INTERPRET=1`` is set *before* any kernel module is imported, so
  Triton kernels run on CPU tensors in the interpreter (tiny grids: ~1 ms per program).
  With a GPU the same tests compile the kernels for real on ``device == "cuda"``.
* ``@pytest.mark.cuda`` tests skip without a GPU; ``@pytest.mark.heavy`` tests (the ``demo`` and
  ``realistic`` presets end to end, minutes each) run only with ``LUNGCORE_HEAVY_TESTS=1``.
* Fixtures: ``device`` (``"cuda"`` when present, else ``"cpu"``), ``backend`` (a context
  manager factory forcing a backend), ``rng`` (a fresh seeded numpy Generator per test).
"""
from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()

# Several xdist workers (make test: -n 2 on 2 cores): one thread per worker, and for the processes the
# tests start. torch's default, a thread per core in every worker, makes the workers' OpenMP teams
# spin against each other: tests/models + tests/ops/test_patch_embed.py took 164 s of wall and 165 s of
# CPU that way, 83 s and 89 s with one thread each. Tests of multithreaded kernels set their own count.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# test helpers shared across folders (tests/_tolerance.py) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lungcore.backend import use_backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    heavy = os.environ.get("LUNGCORE_HEAVY_TESTS") == "1"
    skip_heavy = pytest.mark.skip(reason="opt-in (minutes each): run with LUNGCORE_HEAVY_TESTS=1")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "heavy" in item.keywords and not heavy:
            item.add_marker(skip_heavy)
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def backend():
    return use_backend


@pytest.fixture
def rng(request) -> np.random.Generator:
    # a different but reproducible stream per test
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
