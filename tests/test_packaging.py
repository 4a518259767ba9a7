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
