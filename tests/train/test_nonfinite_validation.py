"""A non-finite validation loss or output is never the "best" epoch: the run stops as for a NaN
training loss (NonFiniteLossError, exit 1), naming the validation row and the last good checkpoint."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

import toy
from conftest import tiny_config
from lungcore.cli import main
from lungcore.models import read_checkpoint
from lungcore.train import NonFiniteLossError, fit


def nan_validation_from(monkeypatch, epoch: int) -> list[str]:
    """ToyClassifier's eval-mode outputs become NaN for the first sample of each batch from the
    ``epoch``-th validation pass on; returns the ids it spoiled."""
    spoiled: list[str] = []
    seen = {"passes": 0, "last_training": True}
    predict = toy.ToyClassifier.predict

    def nan_predict(self, batch):
        out = predict(self, batch)
        if seen["last_training"]:  # a new validation pass
            seen["passes"] += 1
        seen["last_training"] = False
        if seen["passes"] >= epoch:
            out["probability"] = out["probability"].clone()
            out["probability"][0] = math.nan
            spoiled.append(batch["id"][0])
        return out

    train = toy.ToyClassifier.train

    def mark_train(self, mode=True):
        if mode:
            seen["last_training"] = True
        return train(self, mode)

    monkeypatch.setattr(toy.ToyClassifier, "predict", nan_predict)
    monkeypatch.setattr(toy.ToyClassifier, "train", mark_train)
    return spoiled


def test_nan_validation_output_is_never_best_and_stops_the_run(tmp_path, nodule_cohort, cache_dir, monkeypatch):
    spoiled = nan_validation_from(monkeypatch, epoch=2)
    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as caught:
        fit(cfg, out=out)
    message = str(caught.value)
    assert "validation" in message and "at epoch 2" in message and f"(id {spoiled[0]})" in message, message
    assert "validation row " in message and f"last good checkpoint is {out / 'last.pt'}" in message, message
    log = (out / "train.log").read_text()
    assert "epoch 2/3 end" not in log  # never recorded, never "(best)"
    state = read_checkpoint(out / "last.pt")
    assert state["extra"]["trainer"]["epoch"] == 1
    best = read_checkpoint(out / "best_train.pt")
    assert best["extra"]["epoch"] == 1 and math.isfinite(best["extra"]["metrics"]["val_loss"])
    assert not (out / "best.pt").exists()


def test_nan_validation_in_the_first_epoch_is_exit_1_one_line(tmp_path, capsys, nodule_cohort, cache_dir,
                                                              monkeypatch):
    spoiled = nan_validation_from(monkeypatch, epoch=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=1)))
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["train", "--config", str(config), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lungcore train: error: the train validation outputs became non-finite at epoch 1 "
                          "(validation row "), err
    assert f"(id {spoiled[0]})" in err and "No checkpoint was written yet" in err and "--overwrite" in err, err
    assert not (out / "best_train.pt").exists() and not (out / "best.pt").exists()
