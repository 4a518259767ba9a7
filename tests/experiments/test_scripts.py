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
    assert (tmp_path / "synth" / "cmml_synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _run("cmml_ablation.py", *common, "--ratios", "0.75,0.9", "--label-fractions", "0.5", "--n-boot", "20",
         "--out", str(tmp_path / "ablation"))
    md = (tmp_path / "ablation" / "cmml_ablation.md").read_text()
    # on: 2 ratios + CT/clinical only + label-scarce + fresh fusion at both label counts + zero-filling
    assert md.count("\n| on |") == 8 and md.count("\n| off |") == 4
    assert "pretraining on - off, 50% of the labels" in md and "CT mask ratio 0.75 - 0.9" in md
    assert "fusion from the pretrained layers - fresh fusion, 50% of the labels" in md
    assert "## A modality withheld at test time" in md and "CT withheld: completion - zero-filling" in md
    assert (tmp_path / "ablation" / "cmml_ablation_withholding.csv").read_text().count("\n") == 1 + 3 * 5


# the predictions file keeps 6 decimals: two scores (or a score and the 0.5 threshold) closer than this
# may be either way round in the script's unrounded numbers
UNSURE = 1.5e-6


def _auc_bounds(label: list[int], score: list[float]) -> tuple[float, float]:
    """The lowest and highest ROC AUC (Mann-Whitney pair count, ties half: the independent oracle of
    the script's AUCs) that scores known to 6 decimals allow."""
    pos = [s for y, s in zip(label, score) if y == 1]
    neg = [s for y, s in zip(label, score) if y == 0]
    sure = sum(p - n > UNSURE for p in pos for n in neg)
    unsure = sum(abs(p - n) <= UNSURE for p in pos for n in neg)
    return sure / (len(pos) * len(neg)), (sure + unsure) / (len(pos) * len(neg))


@pytest.mark.slow
def test_csfnet_synthetic(tmp_path):
    """Every model of the ablation is in the table, and the AUC, accuracy and confusion matrix the
    script reports are those of the test predictions it saved (recomputed here)."""
    import csv

    _run("csfnet_synthetic.py", "--n", "120", "--epochs", "1", "--n-boot", "20", "--threads", "1",
         "--out", str(tmp_path), "--save-predictions", str(tmp_path / "predictions.csv"))
    variants = ["full", "published", "t1_only", "image_only"]
    with open(tmp_path / "csfnet_synthetic.csv", newline="") as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert list(table) == [*variants, "oracle", "oracle_image"]
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    label = [int(r["label"]) for r in rows]
    assert 0 < sum(label) < len(label)  # both classes in the test split: the AUC is defined
    for v in variants:
        p = [float(r[f"probability_{v}"]) for r in rows]
        r = table[v]
        low, high = _auc_bounds(label, p)
        assert low - 5e-5 <= float(r["auc"]) <= high + 5e-5, (v, r["auc"], low, high)  # the CSV keeps 4 decimals
        assert float(r["auc_lo"]) <= float(r["auc"]) <= float(r["auc_hi"]), v
        sure = sum((q >= 0.5) == (y == 1) for q, y in zip(p, label) if abs(q - 0.5) > UNSURE)
        unsure = sum(abs(q - 0.5) <= UNSURE for q in p)
        assert sure - 5e-5 * len(p) <= float(r["accuracy"]) * len(p) <= sure + unsure + 5e-5 * len(p), v
    full = [float(r["probability_full"]) for r in rows]
    md = (tmp_path / "csfnet_synthetic.md").read_text()
    if all(abs(q - 0.5) > UNSURE for q in full):
        n = {(y, q): sum(1 for yy, qq in zip(label, full) if (yy, qq >= 0.5) == (y, q)) for y in (0, 1)
             for q in (False, True)}
        assert f"| benign | {n[0, False]} | {n[0, True]} |" in md
        assert f"| malignant | {n[1, False]} | {n[1, True]} |" in md
    for model in table.values():  # one table row per model
        assert f"\n| {model['description']} | " in md
    for png in ("csfnet_synthetic_roc.png", "csfnet_synthetic_confusion.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("cmml_nonlinear.py", ["--pretrain-epochs", "1", "--finetune-epochs", "1", "--patch", "4", "8", "8",
                           "--cohorts", "linear", "morphology", "interaction"]),
    ("csfnet_nonlinear.py", ["--epochs", "1", "--fusions", "tokens", "published", "--crops", "1 mm",
                             "--width-scale", "2", "--cohorts", "linear", "morphology", "interaction"]),
])
def test_nonlinear_scripts(script, extra, tmp_path):
    common = ["--workdir", str(tmp_path / "cohorts"), "--n", "60", "--preset", "tiny", "--n-boot", "20",
              "--boosted-trees", "20"]
    _run(script, *common, "--train-seeds", "0", "--out", str(tmp_path), *extra)
    stem = script.removesuffix(".py")
    md = (tmp_path / f"{stem}.md").read_text()
    for cohort in ("linear", "morphology"):
        assert f"| {cohort} |" in md and f"**{cohort}**: oracle - handcrafted" in md
        assert f"| {cohort} | clinical + handcrafted boosted trees |" in md
    assert "seed 0" in md and "handcrafted" in md and "model - boosted trees" in md
    assert (tmp_path / f"{stem}.csv").read_text().count("\n") > 6

    # the networks' test predictions of that run, reused instead of training: the same network rows
    import csv

    saved = {"cmml_nonlinear.py": "test_risks.csv", "csfnet_nonlinear.py": "test_probabilities.csv"}[script]
    earlier = tmp_path / "earlier.csv"
    earlier.write_bytes((tmp_path / "cohorts" / "morphology" / saved).read_bytes())
    _run(script, *common, "--cohorts", "morphology", "--networks-from", str(earlier), "--out", str(tmp_path / "again"))

    def network_rows(path):
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f) if r["model"].startswith(("CMML", "CSF-Net"))]

    first = [r for r in network_rows(tmp_path / f"{stem}.csv") if r["effects"] == "morphology"]
    assert first and network_rows(tmp_path / "again" / f"{stem}.csv") == first
    assert "not trained here" in (tmp_path / "again" / f"{stem}.md").read_text()
    if "--crops" in extra:  # CSF-Net trained on the 1 mm crops, and the report says so
        assert "crops 16 x 32 x 32 at 1 x 1 x 1 mm" in md
        assert "stem_width=8, stages=((16,), (32,), (64,))" in md  # --width-scale 2
        assert "crops 8 x 16 x 16 at 2 x 2 x 2 mm" in (tmp_path / "again" / f"{stem}.md").read_text()
    if "--fusions" in extra:  # both fusions at the same seed, and their paired difference
        assert "| morphology | CSF-Net published fusion seed 0 |" in md
        assert "morphology, CSF-Net seed 0: token fusion - published fusion (same seed, paired)" in md
    if "interaction" in extra:  # the third generator: its cohort, baselines and interaction terms
        assert "**interaction**: oracle - handcrafted" in md
        assert ("| interaction | size | growth | size x positive screen | growth x current smoker | clinical |" in md
                or "| interaction | size | texture | size x PD-L1 low | clinical |" in md)


@pytest.mark.slow
def test_cmml_graph(tmp_path):
    _run("cmml_graph.py", "--workdir", str(tmp_path / "cohort"), "--n", "60", "--seeds", "1", "--tables", "lung",
         "--folds", "2", "--repeats", "1", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--n-boot", "20",
         "--out", str(tmp_path))
    md = (tmp_path / "cmml_graph.md").read_text()
    assert "lung" in md and "t2g" in md and "dense" in md
    assert (tmp_path / "cmml_graph.csv").read_text().count("\n") >= 3


@pytest.mark.slow
def test_csfnet_crops(tmp_path):
    """The crop diagnostic: both resolutions measured and compared with the truth, the three boosted-tree
    rows and the oracle in its table (smoke run: the numbers mean nothing at this size)."""
    _run("csfnet_crops.py", "--workdir", str(tmp_path / "cohorts"), "--n", "60", "--preset", "tiny", "--n-boot", "20",
         "--boosted-trees", "20", "--probe-epochs", "1", "--out", str(tmp_path))
    md = (tmp_path / "csfnet_crops.md").read_text()
    for row in ("| crops | probe: solid fraction vs truth (Spearman) |", "\n| 2 mm | ", "\n| 1 mm | ", "| boosted trees, 2 mm features |",
                "| boosted trees, 1 mm features |", "| boosted trees, true mask features |", "| oracle |",
                "| morphology | size | growth | solid grew >= 0.15 |"):
        assert row in md, row
    assert (tmp_path / "csfnet_crops.csv").read_text().count("\n") == 1 + 4
