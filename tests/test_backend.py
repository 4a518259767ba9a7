"""Backend selection: automatic choice, forcing, availability errors, launch counting."""
from __future__ import annotations

import pytest

from lungcore import backend


@pytest.fixture
def toy_ops():
    backend.register_op("toy_kernel_op", ("triton", "cpu"))
    backend.register_op("toy_reference_only", ())
    yield
    backend._OPS.pop("toy_kernel_op", None)
    backend._OPS.pop("toy_reference_only", None)


def test_automatic_choice(toy_ops, monkeypatch):
    monkeypatch.delenv("LUNGCORE_BACKEND", raising=False)
    assert backend.backend_for("toy_kernel_op", "cpu") == "cpu"           # C++ core is built
    assert backend.backend_for("toy_reference_only", "cpu") == "reference"
    assert backend.backend_for("toy_reference_only", "cuda:0") == "reference"


def test_forcing_by_env_and_context(toy_ops, monkeypatch):
    monkeypatch.setenv("LUNGCORE_BACKEND", "reference")
    assert backend.backend_for("toy_kernel_op", "cpu") == "reference"
    with backend.use_backend("cpu"):                       # the context beats the environment
        assert backend.backend_for("toy_kernel_op", "cpu") == "cpu"
    monkeypatch.setenv("LUNGCORE_BACKEND", "cupy")         # not implemented by the op: automatic
    assert backend.backend_for("toy_kernel_op", "cpu") == "cpu"
    monkeypatch.setenv("LUNGCORE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LUNGCORE_BACKEND"):
        backend.backend_for("toy_kernel_op", "cpu")


def test_forced_triton_on_cpu_needs_the_interpreter(toy_ops, monkeypatch):
    monkeypatch.delenv("LUNGCORE_BACKEND", raising=False)
    with backend.use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend.backend_for("toy_kernel_op", "cpu") == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.backend_for("toy_kernel_op", "cpu")


def test_unknown_names():
    with pytest.raises(KeyError, match="unknown op"):
        backend.backend_for("no_such_op", "cpu")
    with pytest.raises(ValueError, match="unknown backends"):
        backend.register_op("bad", ("tpu",))
    with pytest.raises(ValueError, match="use_backend"):
        with backend.use_backend("tpu"):
            pass


def test_count_launches_sees_only_the_block():
    backend.record_launch("toy.before")
    with backend.count_launches() as launches:
        backend.record_launch("toy.kernel")
        backend.record_launch("toy.kernel")
    backend.record_launch("toy.after")
    assert launches == {"toy.kernel": 2}
    assert backend.launch_counts()["toy.kernel"] >= 2


def test_every_launch_counter_is_named_op_dot_kernel(rng):
    """Run each op's kernels that this machine has (C++ always; Triton in the interpreter on tiny
    inputs): every counter they record is ``<registered op>.<kernel>``."""
    import numpy as np
    import torch

    import lungcore.ops as ops
    from lungcore.metrics import concordance_index

    risk = torch.tensor(rng.normal(size=9), requires_grad=True)
    time, event = torch.tensor(rng.integers(1, 5, 9).astype(float)), torch.tensor(rng.random(9) < 0.6)
    volume = torch.tensor(rng.normal(size=(4, 5, 6)), requires_grad=True)
    with backend.count_launches() as launches:
        for which in ("cpu", "triton") if backend.interpreting() else ("cpu",):
            with backend.use_backend(which):
                ops.cox_ph_loss(risk, time, event).backward()
        with backend.use_backend("cpu"):
            concordance_index(risk.detach().numpy(), time.numpy(), event.numpy())
            ops.resample_crop(volume, (1, 1, 1), 1.0, [[2, 2, 3]], 3, order=3).sum().backward()
            ops.resample_volume(volume.detach().numpy(), (1, 1, 1), 2.0)
        if backend.interpreting():
            with backend.use_backend("triton"):
                x, w = torch.randn(1, 1, 2, 4, 4, requires_grad=True), torch.randn(3, 1, 2, 2, 2, requires_grad=True)
                ops.patch_embed3d(x, w).sum().backward()
                q = torch.randn(1, 1, 3, 4, requires_grad=True)
                ops.masked_cross_attention(q, q, q).sum().backward()
    registered = set(backend.registered_ops())
    assert launches and all(name.split(".")[0] in registered and len(name.split(".")) == 2 for name in launches), \
        dict(launches)
    assert not np.isnan(float(risk.grad.sum()))


def test_info_lists_each_ops_backends_from_the_registry():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lungcore", "info", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)["ops"]
    import lungcore.ops  # noqa: F401  (registers every op)

    registry = backend.registered_ops()
    assert set(report) == set(registry)
    for op, entry in report.items():
        assert set(entry["backends"]) == registry[op].backends
        assert entry["cpu"] in entry["backends"]
    assert report["masked_cross_attention"]["backends"] == ["reference", "torch", "triton"]
    assert report["resample_crop"]["backends"] == ["reference", "cpu", "cupy"]
