"""setup.py installs every package of lungcore/ (a package missing from its explicit list works in an
editable install and is silently absent from a wheel)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_keyword(name: str):
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name}= literal")


def test_every_package_is_installed():
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lungcore").rglob("__init__.py")}
    listed, mapped = set(_setup_keyword("packages")), _setup_keyword("package_dir")
    assert on_disk <= listed, f"missing from setup.py packages: {sorted(on_disk - listed)}"
    stale = {p for p in listed - on_disk if not (p in mapped and (ROOT / mapped[p]).is_dir())}
    assert not stale, f"setup.py lists packages that do not exist: {sorted(stale)}"


LAZY_PACKAGES = ("lungcore", "lungcore.data", "lungcore.train")


def test_lazy_exports_resolve_and_match_the_typed_imports():
    """Every name a lazy package exports resolves (to what its TYPE_CHECKING import names), and the
    three lists (``__all__``, the lazy table, the typed imports) agree."""
    import importlib

    for name in LAZY_PACKAGES:
        package = importlib.import_module(name)
        source = Path(package.__file__).read_text()
        tree = ast.parse(source)
        typed = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.If)
                 for stmt in node.body if isinstance(stmt, ast.ImportFrom) for alias in stmt.names}
        exported = set(package.__all__) - {"__version__"}
        assert typed == exported, (name, typed ^ exported)
        for attr in package.__all__:
            assert getattr(package, attr) is not None and attr in dir(package), (name, attr)
        try:
            getattr(package, "no_such_name")
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError(f"{name}.no_such_name resolved")


def test_the_command_line_starts_without_torch():
    """``lungcore --version`` and every ``--help`` build without importing torch (about 2 s)."""
    import subprocess
    import sys

    code = ("import sys; from lungcore.cli import build_parser, main; build_parser()\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('lungcore'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
