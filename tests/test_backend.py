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
