"""The statistical scripts in experiments/ run end to end on tiny cohorts (smoke runs: the numbers
they write here mean nothing; the committed results come from their full-size defaults)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.slow
def test_cmml_synthetic_and_ablation(tmp_path):
    common = ["--workdir", str(tmp_path / "cohort"), "--n", "80", "--pretrain-epochs", "1", "--finetune-epochs", "2",
              "--threads", "1"]
    _run("cmml_synthetic.py", *common, "--repeat-seeds", "1", "--out", str(tmp_path / "synth"))
    md = (tmp_path / "synth" / "cmml_synthetic.md").read_text()
    for section in ("## 1. Masked pretraining", "## 2. Fine-tuned test C-index", "| 1 |", "CT withheld",
                    "## 3. Breslow", "whole CT masked", "whole record masked"):
        assert section in md
    assert (tmp_path / "synth" / "cmml_synthetic.png").stat().st_size > 0
    _run("cmml_ablation.py", *common, "--ratios", "0.75,0.9", "--label-fractions", "0.5", "--n-boot", "20",
         "--out", str(tmp_path / "ablation"))
    md = (tmp_path / "ablation" / "cmml_ablation.md").read_text()
    # on: 2 ratios + CT/clinical only + label-scarce + fresh fusion at both label counts + zero-filling
    assert md.count("\n| on |") == 8 and md.count("\n| off |") == 4
    assert "pretraining on - off, 50% of the labels" in md and "CT mask ratio 0.75 - 0.9" in md
    assert "fusion from the pretrained layers - fresh fusion, 50% of the labels" in md
    assert "## A modality withheld at test time" in md and "CT withheld: completion - zero-filling" in md
    assert (tmp_path / "ablation" / "cmml_ablation_withholding.csv").read_text().count("\n") == 1 + 3 * 5


@pytest.mark.slow
def test_csfnet_synthetic(tmp_path):
    _run("csfnet_synthetic.py", "--n", "120", "--epochs", "1", "--n-boot", "20", "--threads", "1",
         "--out", str(tmp_path))
    md = (tmp_path / "csfnet_synthetic.md").read_text()
    assert "image oracle" in md or "oracle" in md
    assert (tmp_path / "csfnet_synthetic_roc.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("cmml_nonlinear.py", ["--pretrain-epochs", "1", "--finetune-epochs", "1", "--patch", "4", "8", "8"]),
    ("csfnet_nonlinear.py", ["--epochs", "1"]),
])
def test_nonlinear_scripts(script, extra, tmp_path):
    _run(script, "--workdir", str(tmp_path / "cohorts"), "--n", "60", "--preset", "tiny", "--train-seeds", "0",
         "--n-boot", "20", "--out", str(tmp_path), *extra)
    stem = script.removesuffix(".py")
    md = (tmp_path / f"{stem}.md").read_text()
    for cohort in ("linear", "morphology"):
        assert f"| {cohort} |" in md and f"**{cohort}**: oracle - handcrafted" in md
    assert "seed 0" in md and "handcrafted" in md
    assert (tmp_path / f"{stem}.csv").read_text().count("\n") > 6
