"""Lazy package exports (PEP 562): a package names what it exports and the submodule each comes
from, and imports that submodule on first use. ``import lungcore``, ``lungcore --version`` and
``lungcore synth --help`` then start without importing torch (about 2 s).

Example:
    >>> import sys
    >>> __getattr__, __dir__ = lazy_exports("json", {"JSONDecodeError": "json.decoder"})
    >>> __getattr__("JSONDecodeError").__name__
    'JSONDecodeError'
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each exported name to the module
    that defines it (a submodule itself when the name is that submodule's, e.g. ``"metrics":
    "lungcore.metrics"``). A name is imported once, then cached in the package's namespace."""

    def __getattr__(name: str) -> Any:
        source = exports.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(source)
        value = module if source == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
