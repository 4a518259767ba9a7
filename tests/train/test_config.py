"""TrainConfig checks every field it can before any work: a bad value is a ConfigError naming the
field (``lungcore train`` names the flag instead: tests/train/test_commands.py)."""
from __future__ import annotations

import math

import pytest

from lungcore.train.config import ConfigError, TrainConfig


@pytest.mark.parametrize("d, message", [
    ({"patience": -1}, "patience must be an integer >= 0, got -1"),
    ({"patience": 1.5}, "patience must be an integer >= 0, got 1.5"),
    ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
    ({"epochs": "ten"}, "epochs must be an integer >= 1, got 'ten'"),
    ({"stage_epochs": {"train": 0}}, "stage_epochs.train must be an integer >= 1, got 0"),
    ({"seed": 0.5}, "seed must be an integer, got 0.5"),
    ({"data": {"num_workers": -1}}, "data.num_workers must be an integer >= 0, got -1"),
    ({"data": {"batch_size": 0}}, "data.batch_size must be an integer >= 1, got 0"),
    ({"data": {"eval_batch_size": 0}}, "data.eval_batch_size must be an integer >= 1, got 0"),
    ({"data": {"split_seed": -1}}, "data.split_seed must be an integer >= 0, got -1"),
    ({"data": {"split": [0.5, 0.5, 0.5]}}, "data.split must be 3 fractions (train, val, test) summing to 1"),
    ({"data": {"split": [1.2, -0.1, -0.1]}}, "data.split must be a number >= 0, got -0.1"),
    ({"optim": {"lr": 0}}, "optim.lr must be a number > 0, got 0"),
    ({"optim": {"lr": math.nan}}, "optim.lr must be a number > 0, got nan"),
    ({"optim": {"lr": math.inf}}, "optim.lr must be a number > 0, got inf"),
    ({"optim": {"weight_decay": -1e-4}}, "optim.weight_decay must be a number >= 0, got -0.0001"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas must be a number in [0, 1), got 1.0"),
    ({"optim": {"betas": [0.9]}}, "optim.betas must be 2 numbers in [0, 1)"),
    ({"optim": {"momentum": -0.1}}, "optim.momentum must be a number in [0, 1), got -0.1"),
    ({"optim": {"warmup_epochs": math.nan}}, "optim.warmup_epochs must be a number >= 0, got nan"),
    ({"optim": {"min_lr_ratio": 2}}, "optim.min_lr_ratio must be a number in [0, 1], got 2"),
    ({"optim": {"grad_clip": -1}}, "optim.grad_clip must be a number >= 0, got -1"),
    ({"optim": {"accumulate": 0}}, "optim.accumulate must be an integer >= 1, got 0"),
    ({"optim": {"restart_epochs": math.inf}}, "optim.restart_epochs must be a number > 0, got inf"),
])
def test_every_numeric_field_is_checked(d, message):
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict(d)
    assert message in str(caught.value)
    assert caught.value.field == message.split()[0]


def test_good_values_pass_and_keep_their_meaning():
    cfg = TrainConfig.from_dict({"patience": 0, "epochs": 3.0, "data": {"num_workers": 0, "batch_size": 1},
                                 "optim": {"lr": "1e-3", "grad_clip": 0}})  # YAML reads 1e-3 as a string
    assert cfg.patience == 0 and cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.optim.lr == 1e-3 and TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_a_config_file_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  num_workers: -2\n")
    with pytest.raises(ValueError, match=rf"config file {path}: data.num_workers must be an integer >= 0, got -2"):
        TrainConfig.from_yaml(path)
