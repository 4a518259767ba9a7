"""The optimiser of a training stage and its learning-rate schedule.

``optim.schedule`` is one of ``cosine`` (warm-up, then one cosine to ``min_lr_ratio`` over the
stage), ``constant`` (warm-up, then flat) and ``restarts`` (warm-up, then one cosine per
``restart_epochs``). The warm-up is linear over ``warmup_epochs`` and the same for all three.

Example:
    >>> from lungcore.train.config import OptimConfig
    >>> cosine = OptimConfig(schedule="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    >>> [round(lr_multiplier(s, cosine, steps_per_epoch=4, total=20), 3) for s in (0, 3, 4, 19)]
    [0.25, 1.0, 1.0, 0.109]
    >>> steps_per_epoch(n_train=10, world=1, batch_size=4, accumulate=1)   # (steps, drop_last)
    (2, True)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from lungcore.train.config import OptimConfig, TrainConfig


def cosine(step: int, total: int, min_ratio: float) -> float:
    """Half a cosine from 1 at ``step`` 0 to ``min_ratio`` at ``total`` (and after); 1 when ``total <= 0``."""
    if total <= 0:
        return 1.0
    progress = min(1.0, step / max(1, total))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(step: int, optim: OptimConfig, steps_per_epoch: int, total: int) -> float:
    """The ``optim.schedule`` multiplier of ``optim.lr`` at optimiser step ``step`` of a stage of
    ``total`` steps."""
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "cosine":
        return cosine(step - warmup, total - warmup, optim.min_lr_ratio)
    period = max(1, int(round(optim.restart_epochs * steps_per_epoch)))  # "restarts": one cosine per period
    return cosine((step - warmup) % period, period, optim.min_lr_ratio)


def stage_lr(optim: OptimConfig, steps_per_epoch: int, epochs: float) -> Callable[[int], float]:
    """The learning rate at each optimiser step of a stage of ``epochs`` epochs: ``optim.lr`` times
    the ``optim.schedule`` multiplier. Pair it with :func:`set_lr` at every step.

    Example:
        >>> from lungcore.train.config import OptimConfig
        >>> lr_at = stage_lr(OptimConfig(lr=1e-3, warmup_epochs=1, min_lr_ratio=0.1), steps_per_epoch=4, epochs=5)
        >>> [round(lr_at(s), 6) for s in (0, 3, 19)]
        [0.00025, 0.001, 0.000109]
    """
    total = int(round(steps_per_epoch * epochs))
    return lambda step: optim.lr * lr_multiplier(step, optim, steps_per_epoch, total)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate to ``lr`` times the group's ``lr_scale`` (1 when it has
    none; :func:`optimizer` gives one to a model's own groups, so they follow the schedule)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def steps_per_epoch(n_train: int, world: int, batch_size: int, accumulate: int) -> tuple[int, bool]:
    """``(optimiser steps per epoch, drop_last)`` for ``n_train`` samples over ``world`` ranks: the
    last partial batch is dropped when a rank holds more than one batch."""
    per_rank = math.ceil(n_train / world)
    drop_last = per_rank > batch_size
    batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    return max(1, math.ceil(batches / accumulate)), drop_last


def apply_recipe(cfg: TrainConfig, model: nn.Module) -> TrainConfig:
    """``cfg`` with the model paper's optimiser settings when ``cfg.recipe == "paper"``."""
    if cfg.recipe != "paper":
        return cfg
    recipe = getattr(model, "paper_recipe", None)
    if recipe is None:
        raise ValueError(f"recipe 'paper': the {cfg.model} paper publishes no optimiser recipe lungcore knows; "
                         f"use recipe 'lungcore' and set optim.* yourself")
    d = cfg.to_dict()
    d["optim"].update(recipe())
    return TrainConfig.from_dict(d)


def optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optim.optimizer`` over the trainable parameters; no weight decay on biases and norms.

    A model may give some parameters their own settings: ``model.param_group_overrides()`` maps a
    parameter name to ``{"lr": peak learning rate, "weight_decay": ...}`` (CMML: the T2G graph's
    column embeddings, as T2G-Former's authors train them). Those parameters get a group of their
    own whose ``lr_scale`` (its peak over ``optim.lr``) the trainer applies at every step, so they
    follow the same warm-up and schedule.
    """
    o = cfg.optim
    overrides = model.param_group_overrides() if hasattr(model, "param_group_overrides") else {}
    decay, no_decay = [], []
    own: dict[tuple[tuple[str, float], ...], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in overrides:
            own.setdefault(tuple(sorted(overrides[name].items())), []).append(p)
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": o.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}]
    for key, params in own.items():
        settings = dict(key)
        lr = float(settings.get("lr", o.lr))
        groups.append({"params": params, "lr": lr, "lr_scale": lr / o.lr,
                       "weight_decay": float(settings.get("weight_decay", o.weight_decay))})
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    # foreach: one multi-tensor update instead of a Python loop over the parameters (torch picks it on
    # CUDA only; on CPU the loop cost 70 ms a step for CMML's clinical branch)
    return cls(groups, lr=o.lr, betas=o.betas, foreach=True)
