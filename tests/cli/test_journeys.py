"""The paths users walk, end to end, at the networks' defaults (real `lungcore` subprocesses).

Each journey: ``lungcore synth`` -> ``train`` with no config and nothing but ``--epochs 1`` and
``--batch-size`` -> ``evaluate`` -> ``predict``, for both networks; then the same on cohorts a
hand-written config would hide: clinical columns in another order (a numeric variable after the
last categorical one, CSV columns reversed), one endpoint, and no images at all. The cohorts are
the ``tiny`` preset (``demo`` and ``realistic`` are opt-in: ``LUNGCORE_HEAVY_TESTS=1``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

N = {"survival": 10, "nodules": 10}


def lungcore(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two xdist workers on two cores
    out = subprocess.run([sys.executable, "-m", "lungcore", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=900, env=env)
    if ok:
        assert out.returncode == 0, f"lungcore {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}"
    return out


# ----------------------------------------------------------------------------- cohort variants
def _frame(cohort: Path) -> pd.DataFrame:
    return pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)


def _schema(cohort: Path) -> dict:
    return json.loads((cohort / "manifest.schema.json").read_text())


def _write(cohort: Path, frame: pd.DataFrame, schema: dict) -> None:
    frame.to_csv(cohort / "manifest.csv", index=False)
    (cohort / "manifest.schema.json").write_text(json.dumps(schema, indent=1))


def shuffle_clinical(cohort: Path) -> list[str]:
    """Categorical variables first, numeric ones after them (in the schema); CSV columns reversed."""
    schema = _schema(cohort)
    schema["clinical"] = ([v for v in schema["clinical"] if v["kind"] == "categorical"][::-1]
                          + [v for v in schema["clinical"] if v["kind"] == "numeric"])
    frame = _frame(cohort)
    _write(cohort, frame[frame.columns[::-1]], schema)
    return [v["name"] for v in schema["clinical"]]


def keep_endpoint(cohort: Path, endpoint: str) -> None:
    """A cohort with one endpoint: the other's columns are gone and the schema declares one."""
    other = {"os": "pfs", "pfs": "os"}[endpoint]
    schema = _schema(cohort)
    schema["endpoints"] = [endpoint]
    _write(cohort, _frame(cohort).drop(columns=[f"{other}_time", f"{other}_event"]), schema)


def drop_images(cohort: Path) -> None:
    """A clinical table alone: every image cell and centre empty (the columns stay)."""
    schema = _schema(cohort)
    frame = _frame(cohort)
    for col in schema.get("image_columns") or (["ct"] if schema["kind"] == "survival" else ["ct_t0", "ct_t1"]):
        frame[col] = ""
    for col in [c for c in frame.columns if "centre" in c]:
        frame[col] = ""
    _write(cohort, frame, schema)


def synth(tmp: Path, kind: str, preset: str = "tiny", n: int | None = None) -> Path:
    cohort = tmp / "cohort"
    lungcore("synth", "--kind", kind, "--n", str(n or N[kind]), "--preset", preset, "--out", str(cohort), cwd=tmp)
    return cohort


# ----------------------------------------------------------------------------- the journey
def journey(tmp: Path, model: str, cohort: Path, batch_size: int = 4) -> dict:
    manifest = str(cohort / "manifest.csv")
    run = tmp / "run"
    lungcore("train", "--model", model, "--manifest", manifest, "--out", str(run), "--epochs", "1",
             "--batch-size", str(batch_size), "--no-progress", cwd=tmp)
    payload = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    for name in ("config.yaml", "metrics.csv", "predictions_test.csv", "report/summary.md"):
        assert (run / name).is_file(), name
    ev = lungcore("evaluate", "--checkpoint", str(run / "best.pt"), "--manifest", manifest,
                  "--out", str(tmp / "eval"), cwd=tmp)
    metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
    assert metrics and ev.stdout.strip()
    lungcore("predict", "--checkpoint", str(run / "best.pt"), "--manifest", manifest,
             "--out", str(tmp / "predictions.csv"), cwd=tmp)
    predictions = pd.read_csv(tmp / "predictions.csv")
    assert len(predictions) == len(_frame(cohort))
    return {"config": payload["config"], "metrics": metrics, "predictions": predictions, "run": run}


def _assert_survival(result: dict, endpoints: tuple[str, ...]) -> None:
    cfg = result["config"]
    assert cfg["clinical_dim"] == 256 and tuple(cfg["endpoints"]) == endpoints  # the default width
    assert tuple(cfg["img_size"]) == (32, 128, 128)
    risks = [c for c in result["predictions"].columns if c.endswith("_risk")]
    assert risks == [f"{e}_risk" for e in endpoints]
    assert result["predictions"][risks].notna().all().all()
    for e in ("pfs", "os"):
        assert (f"{e}_harrell_cindex" in result["metrics"]) == (e in endpoints)
        assert (f"{e}_time" in result["predictions"].columns) == (e in endpoints)


# The plain journey at the networks' defaults (synth -> train -> evaluate -> predict, no config) is the
# README's own "Training, evaluation, prediction" block, run by tests/test_readme.py; the journeys
# here are the cohort shapes a hand-written config would hide, each at the defaults too.


def test_cmml_shuffled_clinical_columns_and_os_only(tmp_path):
    """Two cohort shapes a hand-written config hid, in one run (each is a full default-size training):
    numeric variables after the last categorical one, and OS as the only endpoint."""
    cohort = synth(tmp_path, "survival")
    order = shuffle_clinical(cohort)
    assert order[-1] == "pdl1_tps"  # numeric variables after the last categorical one
    keep_endpoint(cohort, "os")
    result = journey(tmp_path, "cmml", cohort)
    _assert_survival(result, ("os",))
    assert tuple(result["config"]["clinical_cardinalities"])[-2:] == (0, 0)


def test_cmml_clinical_table_alone_pfs_only(tmp_path):
    cohort = synth(tmp_path, "survival", n=40)
    keep_endpoint(cohort, "pfs")
    drop_images(cohort)
    result = journey(tmp_path, "cmml", cohort, batch_size=8)
    _assert_survival(result, ("pfs",))
    log = (result["run"] / "train.log").read_text()
    assert "without a CT" in log  # says it trains the clinical branch alone
    assert not (result["run"] / "cache").exists() or not any((result["run"] / "cache").rglob("*.npy"))


def test_schema_with_both_endpoints_but_one_empty_trains_that_one(tmp_path):
    """The schema declares PFS and OS, the CSV has OS data only: the model is fitted to OS alone."""
    cohort = synth(tmp_path, "survival")
    frame = _frame(cohort)
    frame["pfs_time"], frame["pfs_event"] = "", ""
    _write(cohort, frame, _schema(cohort))
    drop_images(cohort)  # the endpoint logic is what is tested here: keep it fast
    _assert_survival(journey(tmp_path, "cmml", cohort), ("os",))


def test_csfnet_shuffled_clinical_columns(tmp_path):
    cohort = synth(tmp_path, "nodules")
    shuffle_clinical(cohort)
    result = journey(tmp_path, "csfnet", cohort)
    assert tuple(result["config"]["clinical_cardinalities"]) == (2, 2, 2, 4, 2, 0)  # schema order, age last
    assert "roc_auc" in result["metrics"] and result["predictions"]["probability"].between(0, 1).all()


def test_csfnet_without_images_is_a_clear_error(tmp_path):
    cohort = synth(tmp_path, "nodules")
    drop_images(cohort)
    out = lungcore("train", "--model", "csfnet", "--manifest", str(cohort / "manifest.csv"), "--out",
                   str(tmp_path / "run"), "--epochs", "1", cwd=tmp_path, ok=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "needs CT images, but every image cell" in out.stderr and "ct_t0, ct_t1" in out.stderr


@pytest.mark.heavy
@pytest.mark.parametrize("preset", ["demo", "realistic"])
@pytest.mark.parametrize("kind,model", [("survival", "cmml"), ("nodules", "csfnet")])
def test_larger_presets(tmp_path, preset, kind, model):
    result = journey(tmp_path, model, synth(tmp_path, kind, preset=preset, n=24))
    assert result["metrics"]
