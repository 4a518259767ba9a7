"""README.md is executable: every fenced ``bash`` and ``python`` block runs, in order, in one fresh
working directory (bash blocks through ``bash -euo pipefail``, python blocks in one shared
namespace, like a reader pasting them into a terminal and one interpreter). A README that drifts
from the code fails CI.

A block may be preceded by one HTML comment of directives (invisible on GitHub)::

    <!-- readme-test: tiny "--n 500 --preset demo" -> "--n 12 --preset tiny" -->
    <!-- readme-test: needs cuda -->
    <!-- readme-test: skip the project's own test command (CI runs it) -->

``tiny "a" -> "b"`` runs the block with ``a`` replaced by ``b`` (cohort and epoch sizes for CI; the
replaced text must occur, so a stale directive fails); ``needs cuda`` runs it only with a GPU
(skipped with that reason otherwise); ``needs processes N`` runs it only with N CUDA devices;
``skip <reason>`` never runs it and reports the reason. Nothing is skipped silently: every
skipped block is its own skipped test with its reason.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->", re.S)
FENCE = re.compile(r"^```(\w*)\s*$")
SUB = re.compile(r'^tiny\s+"(.*)"\s*->\s*"(.*)"$')


@dataclass
class Block:
    line: int                 # line of the opening fence (1-based)
    language: str
    code: str
    subs: list[tuple[str, str]] = field(default_factory=list)
    skip: str | None = None   # reason, when the block does not run here

    @property
    def name(self) -> str:
        return f"README.md:{self.line}:{self.language}"


def parse(text: str) -> list[Block]:
    """The bash/python blocks of a Markdown text with their directives."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: list[str] = []
    i = 0
    while i < len(lines):
        m = DIRECTIVE.search(lines[i])
        if m:
            pending += [d.strip() for d in m.group(1).split(";") if d.strip()]
            i += 1
            continue
        f = FENCE.match(lines[i])
        if not f:
            if lines[i].strip():
                pending = []  # a directive applies to the block right below it
            i += 1
            continue
        start, lang = i + 1, f.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if lang in ("bash", "python"):
            block = Block(start, lang, "\n".join(lines[i + 1:j]) + "\n")
            for d in pending:
                block_directive(block, d)
            blocks.append(block)
        pending = []
        i = j + 1
    return blocks


def block_directive(block: Block, d: str) -> None:
    m = SUB.match(d)
    if m:
        block.subs.append((m.group(1), m.group(2)))
    elif d == "needs cuda":
        if not torch.cuda.is_available():
            block.skip = block.skip or "needs a CUDA GPU"
    elif d.startswith("needs processes"):
        n = int(d.split()[-1])
        if torch.cuda.device_count() < n:
            block.skip = f"needs {n} processes on {n} CUDA devices (torchrun)"
    elif d.startswith("skip "):
        block.skip = d[5:].strip()
    else:
        raise ValueError(f"README directive {d!r} is not one of: tiny \"a\" -> \"b\", needs cuda, "
                         "needs processes N, skip <reason>")


def code_to_run(block: Block) -> str:
    code = block.code
    for old, new in block.subs:
        if old not in code:
            raise AssertionError(f"{block.name}: directive tiny {old!r} -> {new!r}: the block no longer says {old!r}")
        code = code.replace(old, new)
    return code


def run_blocks(blocks: list[Block], workdir: Path) -> list[tuple[Block, str]]:
    """Run the blocks in order in ``workdir``; returns (block, error) for every block that failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    namespace: dict = {"__name__": "__readme__"}
    failures = []
    old = Path.cwd()
    os.chdir(workdir)
    try:
        for block in blocks:
            if block.skip:
                continue
            code = code_to_run(block)
            if block.language == "bash":
                out = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=workdir, env=env,
                                     capture_output=True, text=True, timeout=1200)
                if out.returncode:
                    failures.append((block, f"exit {out.returncode}\n{out.stderr[-3000:]}"))
            else:
                try:
                    exec(compile(code, block.name, "exec"), namespace)
                except Exception:
                    failures.append((block, traceback.format_exc(limit=4)))
    finally:
        os.chdir(old)
    return failures


BLOCKS = parse(README.read_text())


def test_readme_has_the_two_commands_and_runs_everything_else():
    assert BLOCKS and BLOCKS[0].code.split()[:2] == ["make", "demo"]
    skipped = [b for b in BLOCKS if b.skip]
    # only the project's own commands (CI runs them), installs, and what needs a GPU or several
    # processes / machines may be skipped
    for b in skipped:
        assert re.search(r"CUDA|own commands|installs|several machines|processes", b.skip), \
            f"{b.name} skipped without an accepted reason"


def test_readme_blocks_run(tmp_path):
    """Every runnable block, in README order, in one fresh folder."""
    failures = run_blocks(BLOCKS, tmp_path)
    assert not failures, "\n\n".join(f"{b.name} failed:\n{code_to_run(b)}\n--> {err}" for b, err in failures)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip], ids=lambda b: b.name)
def test_skipped_block(block):
    pytest.skip(f"{block.name}: {block.skip}")


def test_a_broken_example_fails(tmp_path):
    """The harness can fail: a wrong flag, a wrong import and a stale directive are all caught."""
    text = ("```bash\nlungcore synth --kind nodules --n 2 --out c --no-such-flag\n```\n\n"
            "```python\nfrom lungcore.metrics import no_such_function\n```\n\n"
            "<!-- readme-test: tiny \"--epochs 10\" -> \"--epochs 1\" -->\n```bash\nlungcore --version\n```\n")
    blocks = parse(text)
    assert [b.language for b in blocks] == ["bash", "python", "bash"] and blocks[2].subs
    failures = run_blocks(blocks[:2], tmp_path)
    assert [b.line for b, _ in failures] == [1, 5]
    assert "no-such-flag" in failures[0][1] and "no_such_function" in failures[1][1]
    with pytest.raises(AssertionError, match="no longer says"):
        code_to_run(blocks[2])
    with pytest.raises(ValueError, match="directive"):
        parse("<!-- readme-test: sometimes -->\n```bash\ntrue\n```\n")
