"""``recipe: paper``: the optimiser and schedule a model's paper published (CSF-Net), through fit."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from conftest import tiny_config
from lungcore.models import create
from lungcore.models.csfnet import CSFNetConfig
from lungcore.train import TrainConfig, fit
from lungcore.train.config import OptimConfig
from lungcore.train.schedule import apply_recipe, lr_multiplier, optimizer


def test_restarts_schedule_equals_torch_cosine_warm_restarts():
    steps_per_epoch, restart_epochs, base = 7, 3, 0.1
    optim = OptimConfig(lr=base, schedule="restarts", restart_epochs=restart_epochs, warmup_epochs=0,
                        min_lr_ratio=0.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=restart_epochs * steps_per_epoch)
    for step in range(3 * restart_epochs * steps_per_epoch + 5):  # three restarts and a bit
        assert math.isclose(base * lr_multiplier(step, optim, steps_per_epoch, 10**6), opt.param_groups[0]["lr"],
                            rel_tol=1e-9, abs_tol=1e-12), step
        opt.step()
        ref.step()


def test_constant_and_cosine_schedules():
    assert lr_multiplier(123, OptimConfig(schedule="constant", warmup_epochs=0), 10, 1000) == 1.0
    cos = OptimConfig(warmup_epochs=1.0, min_lr_ratio=0.1)
    assert lr_multiplier(4, cos, 10, 100) == pytest.approx(0.5)  # warm-up
    assert lr_multiplier(100, cos, 10, 100) == pytest.approx(0.1)  # decayed to min_lr_ratio
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="step")


def test_paper_recipe_for_csfnet_and_none_for_cmml():
    model = create("csfnet", **CSFNetConfig.tiny_overrides())
    cfg = apply_recipe(TrainConfig.from_dict({"model": "csfnet", "recipe": "paper", "optim": {"lr": 5e-3}}), model)
    # the authors' script (hdusyz/Med-STLPN train_cls.py): Adam 1e-4, default betas, cosine 1 -> 0.1
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.betas, cfg.optim.schedule) == ("adam", 1e-4, (0.9, 0.999),
                                                                                           "cosine")
    assert (cfg.optim.min_lr_ratio, cfg.optim.warmup_epochs, cfg.optim.weight_decay) == (0.1, 0.0, 0.0)
    opt = optimizer(model, cfg)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["betas"] == (0.9, 0.999)
    unchanged = TrainConfig.from_dict({"model": "csfnet", "optim": {"lr": 5e-3}})
    assert apply_recipe(unchanged, model) is unchanged
    with pytest.raises(ValueError, match="cmml paper publishes no optimiser recipe"):
        apply_recipe(TrainConfig(model="cmml", recipe="paper"), torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="recipe must be"):
        TrainConfig(recipe="fast")


def test_fit_with_the_paper_recipe(tmp_path, nodule_cohort, cache_dir):
    overrides = CSFNetConfig.tiny_overrides()
    overrides.pop("clinical_cardinalities")
    cfg = tiny_config("csfnet", nodule_cohort, cache_dir, epochs=2, recipe="paper", model_overrides=overrides,
                      data={"preprocess": {"spacing": [2.0, 1.5, 1.5], "crop": [8, 16, 16]}})
    result = fit(cfg, out=tmp_path / "run", lr=2e-4)  # an explicit rate beats the paper's
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["optimizer"] == "adam" and saved["optim"]["schedule"] == "cosine"
    assert saved["optim"]["lr"] == 2e-4 and saved["optim"]["betas"] == [0.9, 0.999]
    assert all(0 < h["lr"] <= 2e-4 for h in result.history)
