"""Every ``>>>`` example in lungcore's docstrings (and the benchmarks package's) runs (one test per module), so a docstring that
drifts from the code fails CI. Examples run from a temporary working directory."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import benchmarks
import lungcore

SKIP = {
    "lungcore.__main__": "runs the command line on import",
}


def _modules() -> list[str]:
    names = ["lungcore"]
    for mod in pkgutil.walk_packages(lungcore.__path__, prefix="lungcore."):
        names.append(mod.name)
    names += [mod.name for mod in pkgutil.iter_modules(benchmarks.__path__, prefix="benchmarks.")]
    return sorted(names)


def _with_examples() -> list[str]:
    out = []
    finder = doctest.DocTestFinder()
    for name in _modules():
        if name in SKIP:
            continue
        module = importlib.import_module(name)
        if any(t.examples for t in finder.find(module, name)):
            out.append(name)
    return out


MODULES = _with_examples()


def test_examples_were_found():
    # the models, data, metrics, ops and training modules all document their calls with examples
    for name in ("lungcore.metrics", "lungcore.models.cmml", "lungcore.data.schema", "lungcore.train.loop",
                 "lungcore.models.registry", "benchmarks.floors"):
        assert name in MODULES, name


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False,
                             report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
