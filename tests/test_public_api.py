"""Every public function and class of lungcore's API documents itself (README, "Users' habits"):
a docstring with a short ``>>>`` example (run by ``tests/test_doctests.py``) and type hints on
every parameter and return value. Where an example needs a cohort on disk (``fit``), the function's
docstring may say "Example: see the module docstring." if that module's example calls it.

The public API is what the packages export (``__all__``, or the names their ``__init__`` imports)
and the two top-level helper modules the package exports (``lungcore.backend``, ``lungcore.checks``).
"""
from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC_MODULES = ("lungcore", "lungcore.ops", "lungcore.nn", "lungcore.models", "lungcore.metrics",
                  "lungcore.data", "lungcore.train", "lungcore.backend", "lungcore.checks")


def _public() -> list[tuple[str, object]]:
    out = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for n in names:
            obj = getattr(module, n)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith("lungcore"):
                out.append((f"{name}.{n}", obj))
    return out


PUBLIC = _public()


def _methods(cls: type) -> list:
    """The class's own public methods (and ``__init__``/``forward``), where its signature is read."""
    return [f for k, f in vars(cls).items()
            if inspect.isfunction(f) and (not k.startswith("_") or k in ("__init__", "forward"))]


def test_the_api_is_found():
    names = {n for n, _ in PUBLIC}
    for expected in ("lungcore.models.CMML", "lungcore.ops.cox_ph_loss", "lungcore.data.read_manifest",
                     "lungcore.train.TrainConfig", "lungcore.checks.finite"):
        assert expected in names


def _module_example_calls(obj: object) -> bool:
    """The docstring of ``obj``'s module has a ``>>>`` example that calls ``obj`` by name."""
    module_doc = inspect.getdoc(importlib.import_module(obj.__module__)) or ""
    lines = [line.strip() for line in module_doc.splitlines()]
    return any(line.startswith((">>>", "...")) and f"{obj.__name__}(" in line for line in lines)


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_docstring_has_an_example(name, obj):
    # an example that needs a cohort on disk may live in the module docstring, once, if the
    # function's docstring says so and that example really calls it
    doc = inspect.getdoc(obj) or ""
    if "Example: see the module docstring" in doc:
        assert _module_example_calls(obj), f"{name}: points to its module docstring, whose examples never call it"
    else:
        assert ">>>" in doc, f"{name}: its docstring has no >>> example"


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_signature_is_typed(name, obj):
    functions = [obj] if inspect.isfunction(obj) else _methods(obj)
    for f in functions:
        sig = inspect.signature(f)
        untyped = [k for k, p in sig.parameters.items()
                   if k not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
        assert not untyped, f"{f.__qualname__}: parameters without a type hint: {untyped}"
        if f.__name__ != "__init__":
            assert sig.return_annotation is not inspect.Signature.empty, f"{f.__qualname__}: no return type"
