"""evaluate / predict at the edges (lungcore/train/inference.py, report.py, checkpoints.py): a missing
label is an empty cell, a pretraining checkpoint is refused, every metric is reported (``null`` with
a note where undefined, computed where defined), rows left out are said, the summary names the
reference it used, and outputs that are not finite are named by row and id."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import toy
from conftest import tiny_config
from lungcore.cli import main
from lungcore.train import evaluate, fit, predict
from lungcore.train.report import predictions_frame, summary_metrics
from lungcore.usage import json_safe

# the metrics of a report (per survival endpoint, or of a classifier): present even when undefined
SURVIVAL_METRICS = ("harrell_cindex", "uno_cindex", "td_auc_mean", "integrated_brier_score",
                    "integrated_brier_score_km", "risk_cut", "logrank_p")
CLASSIFICATION_METRICS = ("roc_auc", "accuracy", "precision", "recall", "specificity", "f1")


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def strict_json(text: str) -> dict:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def edited(manifest, name: str, edit) -> object:
    """A copy of ``manifest`` (schema beside it) changed by ``edit(frame)``."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame = edit(frame)
    path = manifest.parent / f"{name}.csv"
    frame.to_csv(path, index=False)
    (manifest.parent / f"{name}.schema.json").write_text((manifest.parent / "manifest.schema.json").read_text())
    return path


@pytest.fixture(scope="module")
def survival_run(tmp_path_factory, survival_cohort, cache_dir):
    out = tmp_path_factory.mktemp("edges") / "surv"
    fit(tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1), out=out)
    return out


@pytest.fixture(scope="module")
def nodule_run(tmp_path_factory, nodule_cohort, cache_dir):
    out = tmp_path_factory.mktemp("edges") / "nod"
    fit(tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=1), out=out)
    return out


def _every_survival_key(metrics: dict, endpoints=("pfs", "os")) -> None:
    for e in endpoints:
        for k in ("n", "events") + SURVIVAL_METRICS:
            assert f"{e}_{k}" in metrics, (e, k, sorted(metrics))
        for k in ("harrell_cindex", "uno_cindex"):
            assert f"{e}_{k}_low" in metrics and f"{e}_{k}_high" in metrics


# --------------------------------------------------------------------------------------------------
# 1. predict: a nodule without a label has an empty label cell, not -1


def test_predictions_frame_leaves_a_missing_label_empty():
    pred = {"id": ["a", "b", "c"], "probability": np.array([0.2, 0.7, 0.4], np.float32),
            "label": np.array([1, -1, 0]), "label_mask": np.array([True, False, True])}
    frame = predictions_frame(pred, "classification")
    assert frame["label"].tolist()[0] == 1 and frame["label"].tolist()[2] == 0
    assert pd.isna(frame["label"][1])
    assert frame.to_csv(index=False).splitlines()[2] == "b,0.7,1,"


def test_predict_without_label_column_or_with_empty_labels_writes_empty_cells(tmp_path, nodule_run, nodule_cohort,
                                                                              cache_dir, capsys):
    dropped = edited(nodule_cohort, "nolabel", lambda f: f.drop(columns=["label"]))
    rc, _, err = run(capsys, "predict", "--checkpoint", nodule_run / "best.pt", "--manifest", dropped,
                     "--out", tmp_path / "a.csv", "--no-progress", "--cache", cache_dir)
    assert rc == 0, err
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0].endswith(",label") and all(line.endswith(",") for line in lines[1:]), lines[:3]

    def blank(f):
        f.loc[[1, 4], "label"] = ""
        return f
    partial = edited(nodule_cohort, "partial", blank)
    rc, _, err = run(capsys, "predict", "--checkpoint", nodule_run / "best.pt", "--manifest", partial,
                     "--out", tmp_path / "b.csv", "--no-progress", "--cache", cache_dir)
    assert rc == 0, err
    got = pd.read_csv(tmp_path / "b.csv", dtype=str, keep_default_na=False)["label"].tolist()
    want = pd.read_csv(partial, dtype=str, keep_default_na=False)["label"].tolist()
    assert got == want and "-1" not in got


# --------------------------------------------------------------------------------------------------
# 2. a checkpoint of the pretraining stage is refused by evaluate and predict, before any image is read


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_pretraining_checkpoint_is_refused(tmp_path, capsys, survival_run, survival_cohort, command, monkeypatch):
    import lungcore.train.preflight as preflight
    from lungcore.models.registry import read_checkpoint

    assert read_checkpoint(survival_run / "best_pretrain.pt")["extra"]["stage"] == "pretrain"
    monkeypatch.setattr(preflight, "read_every_image", lambda *a, **k: pytest.fail("an image was read"))
    extra = ["--out", tmp_path / "p.csv"] if command == "predict" else []
    rc, out, err = run(capsys, command, "--checkpoint", survival_run / "best_pretrain.pt", "--manifest",
                       survival_cohort, *extra)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"lungcore {command}: error: --checkpoint {survival_run / 'best_pretrain.pt'}"), err
    assert "'pretrain' stage" in err and f"use {survival_run / 'best.pt'}" in err, err
    with pytest.raises(ValueError, match=r"^checkpoint .*'pretrain' stage"):  # the API names its argument
        (predict if command == "predict" else evaluate)(survival_run / "best_pretrain.pt", survival_cohort)


def test_a_pretrain_only_run_says_to_train_the_last_stage(tmp_path, capsys, survival_cohort, cache_dir):
    out = tmp_path / "pre"
    result = fit(tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1, stage="pretrain"), out=out)
    # the run itself scores no test split with heads it never trained, and says so
    assert result.test_metrics == {} and not (out / "report").exists()
    assert "test: not scored: stage 'pretrain' trains no prediction head" in (out / "train.log").read_text()
    rc, _, err = run(capsys, "evaluate", "--checkpoint", out / "best.pt", "--manifest", survival_cohort)
    assert rc == 2 and "'pretrain' stage" in err and "train the 'finetune' stage" in err, err


# --------------------------------------------------------------------------------------------------
# 3. every metric is reported: computed where defined (a C-index needs one comparable pair), null
#    with a note where not


def _pred(time, event, risk, mask=None):
    n = len(time)
    return {"id": [f"P{i}" for i in range(n)], "patient_id": [f"P{i}" for i in range(n)],
            "os": np.asarray(risk, np.float32), "os_time": np.asarray(time, np.float32),
            "os_event": np.asarray(event, np.float32),
            "os_mask": np.ones(n, bool) if mask is None else np.asarray(mask)}


def test_two_patients_have_a_cindex_and_every_key_is_there():
    notes: list[str] = []
    flat = summary_metrics("survival", _pred([30.3, 4.2], [1, 1], [0.1, 0.9]), notes=notes)
    _every_survival_key(flat, ("os",))
    assert flat["os_n"] == 2 and flat["os_harrell_cindex"] == 1.0
    assert math.isnan(flat["os_harrell_cindex_low"])  # no interval from 2 patients: said so
    assert any(n.startswith("os_harrell_cindex_low/_high") and "no 95% interval" in n for n in notes), notes


@pytest.mark.parametrize("time, event, mask, why", [
    ([5.0], [1], None, "no comparable pair among the 1 row"),
    ([5.0, 7.0, 9.0], [0, 0, 0], None, "no os event among the 3 rows"),
    ([5.0, 7.0], [1, 0], [False, False], "no row has the os endpoint"),
])
def test_undefined_metrics_are_nan_with_a_note(time, event, mask, why):
    notes: list[str] = []
    flat = summary_metrics("survival", _pred(time, event, np.linspace(0, 1, len(time)), mask), notes=notes)
    _every_survival_key(flat, ("os",))
    assert math.isnan(flat["os_harrell_cindex"]) and math.isnan(flat["os_uno_cindex"])
    assert any("os_harrell_cindex" in n and why in n for n in notes), notes
    assert json.dumps(json_safe(flat), allow_nan=False)


def test_classification_metrics_of_one_class_are_null_with_a_note():
    notes: list[str] = []
    pred = {"id": ["a", "b"], "label": np.array([1, 1]), "label_mask": np.array([True, True]),
            "probability": np.array([0.7, 0.9], np.float32)}
    flat = summary_metrics("classification", pred, notes=notes)
    assert set(CLASSIFICATION_METRICS) <= set(flat) and math.isnan(flat["roc_auc"]) and flat["accuracy"] == 1.0
    assert any(n.startswith("roc_auc") and "only one class" in n for n in notes), notes


def test_evaluate_two_patients_prints_every_metric_and_says_why_one_is_null(tmp_path, capsys, survival_run,
                                                                             survival_cohort):
    frame = pd.read_csv(survival_cohort, dtype=str, keep_default_na=False)
    both = [i for i in range(len(frame)) if frame.loc[i, "os_time"] and frame.loc[i, "pfs_time"]]
    two = edited(survival_cohort, "two", lambda f: f.iloc[both[:2]])
    rc, out, err = run(capsys, "evaluate", "--checkpoint", survival_run / "best.pt", "--manifest", two,
                       "--out", tmp_path / "rep", "--no-progress")
    assert rc == 0, err
    metrics = strict_json(out)
    _every_survival_key(metrics)
    assert metrics["os_n"] == 2 and strict_json((tmp_path / "rep" / "metrics.json").read_text()).keys() == \
        metrics.keys()
    for e in ("pfs", "os"):  # computed where a comparable pair exists, else null with a note on stderr
        if metrics[f"{e}_harrell_cindex"] is None:
            assert f"lungcore evaluate: {e}_harrell_cindex" in err, err
        else:
            assert 0 <= metrics[f"{e}_harrell_cindex"] <= 1
    assert "no 95% interval from 2 rows" in err and "no 95% interval from 2 rows" in \
        (tmp_path / "rep" / "summary.md").read_text()


def test_train_on_a_tiny_cohort_says_what_the_test_split_gives(tmp_path, capsys, cache_dir):
    from lungcore.data import synth_cohort

    synth_cohort("survival", tmp_path / "c", n=7, preset="tiny", seed=3)
    capsys.readouterr()
    result = fit(tiny_config("toy_survival", tmp_path / "c" / "manifest.csv", cache_dir, epochs=1),
                 out=tmp_path / "run")
    err = capsys.readouterr().err
    _every_survival_key(result.test_metrics)
    test_line = next(line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if " test: " in line)
    assert test_line.split(" test: ", 1)[1].strip(), test_line
    assert "lungcore train: test split: " in err and " null: " in err, err
    assert "test split: " in (tmp_path / "run" / "train.log").read_text()


# --------------------------------------------------------------------------------------------------
# 4. evaluate says which rows it leaves out


def test_evaluate_says_how_many_unlabelled_rows_it_leaves_out(capsys, nodule_run, nodule_cohort):
    part = edited(nodule_cohort, "part3", lambda f: f.assign(label=["" if i in (1, 4, 8) else v
                                                                    for i, v in enumerate(f["label"])]))
    n = len(pd.read_csv(part))
    rc, out, err = run(capsys, "evaluate", "--checkpoint", nodule_run / "best.pt", "--manifest", part,
                       "--no-progress")
    assert rc == 0, err
    assert strict_json(out)["n"] == n - 3
    assert f"lungcore evaluate: left out 3 of {n} rows of {part} without a label" in err, err


def test_evaluate_says_how_many_rows_lack_an_endpoint(capsys, survival_run, survival_cohort):
    frame = pd.read_csv(survival_cohort, dtype=str, keep_default_na=False)
    missing = {e: int((frame[f"{e}_time"] == "").sum()) for e in ("pfs", "os")}
    assert missing["pfs"] > 0  # the synthetic cohort has patients without PFS
    rc, out, err = run(capsys, "evaluate", "--checkpoint", survival_run / "best.pt", "--manifest", survival_cohort,
                       "--no-progress")
    assert rc == 0, err
    assert strict_json(out)["pfs_n"] == len(frame) - missing["pfs"]
    assert f"left out {missing['pfs']} of {len(frame)} rows of {survival_cohort} without the pfs endpoint" in err, err


# --------------------------------------------------------------------------------------------------
# 5. the summary names the reference it used


def test_summary_names_the_reference_actually_used(tmp_path, survival_run, survival_cohort):
    assert "the training split" in (survival_run / "report" / "summary.md").read_text()
    evaluate(survival_run / "best.pt", survival_cohort, tmp_path / "own")
    own = (tmp_path / "own" / "summary.md").read_text()
    assert "training" not in own and "Breslow baseline hazard of the evaluated cohort itself" in own
    assert "Risk groups split at the median risk of the evaluated cohort itself" in own
    evaluate(survival_run / "best.pt", survival_cohort, tmp_path / "ref", reference_manifest=survival_cohort)
    ref = (tmp_path / "ref" / "summary.md").read_text()
    assert "training" not in ref and f"Breslow baseline hazard of the reference cohort ({survival_cohort})" in ref


# --------------------------------------------------------------------------------------------------
# 6. outputs that are not finite: predict warns naming the rows, evaluate's error names them


@pytest.fixture
def nan_for_far_values(monkeypatch):
    """The toy network's risks are NaN where a standardised clinical value is huge (as CMML's are)."""
    plain = toy.ToySurvival.predict

    def far_is_nan(self, batch):
        far = batch["clinical"].abs().amax(1) > 1e6
        return {k: torch.where(far, torch.full_like(v, math.nan), v) for k, v in plain(self, batch).items()}
    monkeypatch.setattr(toy.ToySurvival, "predict", far_is_nan)


def test_outputs_that_are_not_finite_are_named(tmp_path, capsys, survival_run, survival_cohort, nan_for_far_values):
    big = edited(survival_cohort, "big", lambda f: f.assign(age=["1e25" if i == 1 else v
                                                                for i, v in enumerate(f["age"])]))
    rid = pd.read_csv(big, dtype=str)["patient_id"][1]
    rc, _, err = run(capsys, "predict", "--checkpoint", survival_run / "best.pt", "--manifest", big,
                     "--out", tmp_path / "p.csv", "--no-progress")
    assert rc == 0, err
    assert f"of {big} is not finite" in err and f"row 3 (id {rid}): pfs_risk, os_risk are not finite" in err, err
    assert "'age' value 1e25" in err, err
    frame = pd.read_csv(tmp_path / "p.csv")
    assert frame["os_risk"].isna().tolist() == [i == 1 for i in range(len(frame))]  # the others are kept
    rc, out, err = run(capsys, "evaluate", "--checkpoint", survival_run / "best.pt", "--manifest", big,
                       "--no-progress")
    assert rc == 1 and out == "", err
    assert "Traceback" not in err and "row 3, column 'age', value '1e25'" in err and rid in err, err
