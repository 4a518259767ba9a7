"""benchmarks/bench_train.py builds its cases, checks fused == reference losses and runs a step each.

"Fused" must mean kernels ran, not the reference twice. The reference side is
``use_backend("reference")`` (the plain-PyTorch oracles, no kernel launch). The fused side is
forced per case through ``LUNGCORE_BACKEND`` and its launches counted: CSF-Net with the Triton
kernels (the interpreter on a CPU machine), CMML fine-tuning with the C++ Cox kernel. CMML
pretraining has no CPU kernel and its Triton version takes minutes in the interpreter, so on a
CPU machine its fused side is the ``torch`` fast paths (SDPA, Conv3d), distinct code from the
oracles; tests/ops prove those ops' kernels one by one.
"""
from __future__ import annotations

import pytest

from benchmarks import bench_train
from lungcore import backend

FORCED = {"csfnet": ("triton", "masked_cross_attention."), "cmml finetune": ("cpu", "cox_ph_loss.cpu_")}


@pytest.fixture(scope="module")
def cases():
    built = bench_train.cases("cpu", quick=True)
    assert len(built) == 3
    return built


def test_fused_check_runs_the_kernels(cases, monkeypatch):
    for case in cases:
        forced = next((v for k, v in FORCED.items() if case.shape.startswith(k)), None)
        if forced is None:  # CMML pretraining: the torch paths (no CPU kernel), not the reference
            assert backend.backend_for("masked_cross_attention", "cpu") == "torch"
            assert backend.backend_for("patch_embed3d", "cpu") == "torch"
            case.check()
            continue
        name, prefix = forced
        monkeypatch.setenv("LUNGCORE_BACKEND", name)
        with backend.count_launches() as launches:
            case.check()
        monkeypatch.delenv("LUNGCORE_BACKEND")
        assert any(k.startswith(prefix) for k in launches), (case.shape, dict(launches))


def test_every_provider_takes_a_finite_step(cases):
    for case in cases:
        for fn in case.providers.values():
            assert bool(fn().isfinite())
