"""The GPU campaign script's CPU dry run (LUNGCORE_CAMPAIGN_CPU=1): it runs end to end and leaves
what the device tool can bring back (at most 8 plain files, at most 2 folders deep, plain names)."""
from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_campaign_dry_run_leaves_at_most_8_returnable_files(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(LUNGCORE_CAMPAIGN_CPU="1", OUT=str(out), LUNGCORE_COMMIT="dryrun")
    proc = subprocess.run(["bash", "benchmarks/gpu_campaign.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8, files
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
    names = {p.name for p in files}
    assert {"environment.txt", "tests.log", "tests.xml", "bench.log", "bench.tgz", "summary.md"} <= names
    # the GPU tests were collected (imports and parametrisation are sound), the benchmark ran
    log = (out / "tests.log").read_text()
    assert "test_gpu_headline.py" in log and "collected" in log
    with tarfile.open(out / "bench.tgz") as tar:
        members = tar.getnames()
    assert "bench/results.json" in members and "bench/results.md" in members
    summary = (out / "summary.md").read_text()
    assert "dryrun" in summary and "tests: exit 0" in summary and "benchmarks: exit 0" in summary
