"""fit / evaluate / predict end to end with tiny networks and tiny cohorts (seconds each)."""
from __future__ import annotations

import csv
import math

import pandas as pd
import pytest
import torch

from conftest import tiny_config
from lungcore.cli import main
from lungcore.models import read_checkpoint
from lungcore.train import NonFiniteLossError, TrainConfig, fit
from lungcore.train.config import OptimConfig
from lungcore.train.schedule import lr_multiplier


def test_survival_two_stages_checkpoints_and_report(tmp_path, survival_cohort, cache_dir):
    out = tmp_path / "run"
    result = fit(tiny_config("toy_survival", survival_cohort, cache_dir), out=out)
    assert [(h["stage"], h["epoch"]) for h in result.history] == [
        ("pretrain", 1), ("pretrain", 2), ("finetune", 1), ("finetune", 2)]
    for name in ("best.pt", "best_pretrain.pt", "best_finetune.pt", "last.pt", "metrics.csv", "config.yaml",
                 "splits.json", "predictions_test.csv", "report/summary.md", "report/training_curves.png",
                 "report/km_os.png", "report/metrics.json"):
        assert (out / name).is_file(), name
    extra = read_checkpoint(out / "best.pt")["extra"]
    assert extra["schema"]["fitted"] and extra["schema"]["kind"] == "survival"
    assert extra["preprocess"]["crop"] == [4, 8, 8]
    assert extra["stage"] == "finetune" and extra["task"] == "survival"
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 4 and "val_cindex" in rows[-1] and "samples_per_s" in rows[0]
    assert "os_harrell_cindex" in result.test_metrics and "os_integrated_brier_score" in result.test_metrics
    summary = (out / "report" / "summary.md").read_text()
    assert "uno_cindex" in summary and "95% CI" in summary


def test_classifier_predict_and_evaluate_cli(tmp_path, nodule_cohort, cache_dir, capsys):
    out = tmp_path / "run"
    result = fit(tiny_config("toy_classifier", nodule_cohort, cache_dir), out=out)
    assert (out / "report" / "confusion_matrix.png").is_file()
    assert "roc_auc" in result.test_metrics
    pred = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(out / "best.pt"), "--manifest", str(nodule_cohort),
                 "--out", str(pred)]) == 0
    frame = pd.read_csv(pred)
    manifest = pd.read_csv(nodule_cohort)
    assert len(frame) == len(manifest) and frame["probability"].between(0, 1).all()
    assert list(frame["id"]) == list(manifest["nodule_id"])
    # the checkpoint's schema + preprocessing code the manifest exactly as training did
    test = pd.read_csv(out / "predictions_test.csv").set_index("id")
    again = frame.set_index("id").loc[test.index]
    assert (again["probability"] - test["probability"]).abs().max() < 1e-6
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--manifest", str(nodule_cohort),
                 "--out", str(tmp_path / "eval")]) == 0
    assert '"roc_auc"' in capsys.readouterr().out
    assert (tmp_path / "eval" / "summary.md").is_file()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nodule_cohort, cache_dir):
    # 17 training nodules, batch 6, drop_last: 2 steps per epoch; NaN from the 3rd loss call = epoch 2
    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=3, model_overrides={"nan_after": 2})
    with pytest.raises(NonFiniteLossError, match=r"became nan at epoch 2.*last\.pt"):
        fit(cfg, out=tmp_path / "run")
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert state["extra"]["trainer"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_early_stopping(tmp_path, nodule_cohort, cache_dir):
    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=6, patience=1, monitor="val_loss",
                      optim={"lr": 1e-12, "warmup_epochs": 0})
    result = fit(cfg, out=tmp_path / "run")
    assert len(result.history) < 6
    assert "early stop" in (tmp_path / "run" / "train.log").read_text()


def test_clear_errors(tmp_path, nodule_cohort, cache_dir, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["predict", "--checkpoint", str(bad), "--manifest", str(nodule_cohort),
                 "--out", str(tmp_path / "p.csv")]) == 2  # usage errors exit 2 (lungcore.usage)
    assert "corrupt" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--manifest", str(nodule_cohort)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--model", "no-such-net", "--manifest", str(nodule_cohort), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2
    assert "unknown model 'no-such-net'" in capsys.readouterr().err
    frame = pd.read_csv(nodule_cohort, dtype=str, keep_default_na=False).drop(columns=["smoking"])
    broken = nodule_cohort.parent / "broken.csv"
    frame.to_csv(broken, index=False)
    (nodule_cohort.parent / "broken.schema.json").write_text((nodule_cohort.parent / "manifest.schema.json").read_text())
    assert main(["train", "--model", "toy_classifier", "--manifest", str(broken), "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 1  # a manifest problem: the data failed
    assert "smoking" in capsys.readouterr().err
    frame = pd.read_csv(nodule_cohort, dtype=str, keep_default_na=False).drop(columns=["label"])
    unlabelled = nodule_cohort.parent / "unlabelled.csv"
    frame.to_csv(unlabelled, index=False)
    (nodule_cohort.parent / "unlabelled.schema.json").write_text(
        (nodule_cohort.parent / "manifest.schema.json").read_text())
    assert main(["train", "--model", "toy_classifier", "--manifest", str(unlabelled), "--out", str(tmp_path / "u"),
                 "--no-progress"]) == 2
    assert "column 'label' is missing or empty" in capsys.readouterr().err
    assert main(["train", "--model", "toy_survival", "--manifest", str(nodule_cohort), "--out", str(tmp_path / "z"),
                 "--no-progress"]) == 2
    assert "survival" in capsys.readouterr().err


def test_config_yaml_round_trip_and_unknown_keys(tmp_path):
    cfg = TrainConfig.from_dict({"model": "csfnet", "epochs": 3, "data": {"batch_size": 2},
                                 "optim": {"lr": 0.01, "accumulate": 2}})
    path = cfg.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(path) == cfg
    with pytest.raises(ValueError, match="unknown keys.*'epoch'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="optim: unknown keys"):
        TrainConfig.from_dict({"optim": {"learning_rate": 3}})


def test_schedule_warmup_then_cosine():
    optim = OptimConfig(schedule="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    lr = [lr_multiplier(s, optim, 4, 20) for s in range(21)]  # 4 warm-up steps of a 20-step stage
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    # then half a cosine from 1 to 0.1 over the 16 remaining steps (the closed form, step by step)
    for s in range(4, 21):
        assert math.isclose(lr[s], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)), rel_tol=1e-12), s


def test_real_csfnet_tiny(tmp_path, nodule_cohort, cache_dir):
    from lungcore.models.csfnet import CSFNetConfig

    overrides = CSFNetConfig.tiny_overrides()
    overrides.pop("clinical_cardinalities")  # taken from the cohort's schema
    cfg = tiny_config("csfnet", nodule_cohort, cache_dir, epochs=1, model_overrides=overrides,
                      data={"preprocess": {"spacing": [2.0, 1.5, 1.5], "crop": [8, 16, 16]}})
    result = fit(cfg, out=tmp_path / "run")
    assert math.isfinite(result.history[-1]["train_loss"])
    assert "roc_auc" in result.test_metrics
    # train_n: the labelled nodules the epoch trained on (17 in the training split, batch 6, drop_last: 12),
    # not the mean batch size
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["train_n"] for r in rows] == ["12"]


def test_real_cmml_tiny_two_stages_and_breslow_baseline(tmp_path, survival_cohort, cache_dir):
    from lungcore.models import load_model

    tiny = dict(patch_size=(2, 4, 4), embed_dim=16, depth=1, num_heads=2, decoder_dim=8, decoder_depth=1,
                decoder_heads=2, clinical_dim=16, clinical_depth=1, clinical_heads=2, clinical_decoder_depth=1,
                fusion_heads=2, img_size=(4, 8, 8))
    result = fit(tiny_config("cmml", survival_cohort, cache_dir, epochs=1, model_overrides=tiny), out=tmp_path / "run")
    assert [h["stage"] for h in result.history] == ["pretrain", "finetune"]
    model, extra = load_model(result.best_checkpoint)
    assert model.baseline.fitted and extra["baseline"].startswith("breslow")
    assert "os_integrated_brier_score" in result.test_metrics
