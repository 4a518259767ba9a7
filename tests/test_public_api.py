"""Every public function and class of lungcore's API documents itself (README, "Users' habits"):
a docstring with a short ``>>>`` example (run by ``tests/test_doctests.py``) and type hints on
every parameter and return value. Where an example needs a cohort on disk (``fit``), the function's
docstring may say "Example: see the module docstring." if that module's example calls it.
The public methods and properties of the exported classes (their own or a lungcore base's; not
what torch.nn.Module, dataclasses or object add) have a docstring and the same type hints.

The public API is what the packages export (``__all__``, or the names their ``__init__`` imports)
and the two top-level helper modules the package exports (``lungcore.backend``, ``lungcore.checks``).
"""
from __future__ import annotations

import functools
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
CLASSES = [(n, obj) for n, obj in PUBLIC if inspect.isclass(obj)]


def _methods(cls: type) -> list:
    """The functions behind the class's public methods and properties (and ``__init__``/``forward``),
    where their signatures and docstrings are read: plain, static and class methods, property
    getters and setters, defined by the class or a lungcore base (not torch.nn.Module, dataclass
    machinery or object); a name the class overrides is read once, from the class."""
    seen, out = set(), []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("lungcore"):
            continue
        for k, attr in vars(klass).items():
            if k in seen or (k.startswith("_") and k not in ("__init__", "forward")):
                continue
            seen.add(k)
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if isinstance(attr, property):
                out += [f for f in (attr.fget, attr.fset) if f is not None]
            elif isinstance(attr, functools.cached_property):
                out.append(attr.func)
            elif inspect.isfunction(attr):
                out.append(attr)
    return out


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


@pytest.mark.parametrize("name, cls", CLASSES, ids=[n for n, _ in CLASSES])
def test_public_methods_have_docstrings(name, cls):
    # the function's own docstring: inspect.getdoc would lend an override the docstring of the
    # method it overrides (nn.Module.forward's); __init__ is documented by the class, a property by
    # its getter
    setters = {id(attr.fset) for klass in cls.__mro__ for attr in vars(klass).values() if isinstance(attr, property)}
    bare = [f.__qualname__ for f in _methods(cls)
            if f.__name__ != "__init__" and id(f) not in setters and not (f.__doc__ or "").strip()]
    assert not bare, f"{name}: public methods or properties without a docstring: {bare}"
