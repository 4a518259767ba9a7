"""setup.py installs every package of lungcore/ (a package missing from its explicit list works in an
editable install and is silently absent from a wheel)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_packages() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return {ast.literal_eval(e) for e in node.value.elts}
    raise AssertionError("setup.py has no packages=[...] list")


def test_every_package_is_installed():
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lungcore").rglob("__init__.py")}
    listed = _setup_packages()
    assert on_disk <= listed, f"missing from setup.py packages: {sorted(on_disk - listed)}"
    stale = {p for p in listed - on_disk if p not in ("lungcore.triton_kernels", "lungcore._cuda")}
    assert not stale, f"setup.py lists packages that do not exist: {sorted(stale)}"
