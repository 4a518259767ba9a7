"""What a training run's checkpoints carry, and the trainer state that ``last.pt`` resumes from.

Every checkpoint (``best_<stage>.pt``, ``best.pt``, ``last.pt``) holds the model, the fitted
cohort schema, the preprocessing settings and the resolved config (:func:`checkpoint_extra`);
``last.pt`` adds the :class:`TrainerState` under ``extra["trainer"]``. :class:`TrainerState` is
the one place that builds, saves and restores that state (the trainer, ``--resume``).

Example:
    >>> state = TrainerState(stage_index=1, epoch=3, step=30, best=0.7, best_epoch=2)
    >>> TrainerState.from_dict(state.to_dict()) == state
    True
    >>> state.next_stage({}).epoch, state.next_stage({}).stage_index
    (0, 2)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lungcore.train import distributed as dist_utils


def plain(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with numpy floats as Python floats (what ``torch.load(weights_only=True)`` reads back)."""
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in row.items()}


@dataclass
class TrainerState:
    """Where training stands: stage, epoch and optimiser step, model selection, the history rows."""

    stage_index: int = 0
    epoch: int = 0           # finished epochs of this stage
    step: int = 0            # optimiser steps of this stage
    best: float | None = None
    best_epoch: int = -1
    bad: int = 0             # epochs since the monitored metric last improved
    done: bool = False       # stopped early (patience)
    optimizer: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch, every stage
    finished: bool = False   # every stage done and the test report written

    def to_dict(self) -> dict[str, Any]:
        """The ``extra["trainer"]`` dict of ``last.pt``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "finished"}
        d["history"] = [plain(h) for h in self.history]
        if self.finished:
            d["finished"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in d.items() if k in names})
        state.history = list(state.history)
        return state

    @classmethod
    def read(cls, last: str | os.PathLike) -> tuple[TrainerState | None, dict[str, Any]]:
        """``(state, payload)`` of a ``last.pt``; state None when it holds none."""
        from lungcore.models.registry import read_checkpoint

        payload = read_checkpoint(last)
        trainer = payload.get("extra", {}).get("trainer")
        return (None if trainer is None else cls.from_dict(trainer)), payload

    def next_stage(self, optimizer_state: dict[str, Any]) -> TrainerState:
        """The state a following stage starts from (a fresh optimiser, the history kept)."""
        return TrainerState(stage_index=self.stage_index + 1, optimizer=optimizer_state, history=self.history)


def checkpoint_extra(data: Any, cfg: Any, stage: str, **more: Any) -> dict[str, Any]:
    """The ``extra`` of every checkpoint of a run: what evaluate/predict need to code a new manifest."""
    from lungcore.train.cohort import model_task

    return {"schema": data.schema.to_dict(), "preprocess": data.settings.to_dict(), "train_config": cfg.to_dict(),
            "stage": stage, "task": model_task(cfg.model), **more}


def save(model: nn.Module, path: Path, extra: dict[str, Any], state: TrainerState | None = None) -> None:
    """Write a checkpoint (on the main rank; every rank waits), with ``state`` as ``extra["trainer"]``."""
    from lungcore.models.registry import save_model

    if dist_utils.is_main():
        save_model(model, path, extra if state is None else {**extra, "trainer": state.to_dict()})
    dist_utils.barrier()


def mark_finished(last: str | os.PathLike) -> None:
    """Record in ``last.pt`` that the run finished (test report written): a later ``--resume`` says so."""
    from lungcore.models.registry import write_checkpoint

    state, payload = TrainerState.read(last)
    state = state or TrainerState()
    state.finished = True
    payload.setdefault("extra", {})["trainer"] = state.to_dict()
    write_checkpoint(payload, last)


def stage_problem(payload: dict[str, Any], model: nn.Module) -> str | None:
    """Why a checkpoint cannot predict, or None: one saved during a stage before the model's last
    (CMML's ``pretrain``: self-supervised reconstruction; its risk heads were never trained). The
    stage is ``extra["stage"]`` (:func:`checkpoint_extra`); a checkpoint without it (saved outside
    ``lungcore train``) is not judged.

    Example:
        >>> from types import SimpleNamespace
        >>> cmml = SimpleNamespace(stages=("pretrain", "finetune"))
        >>> stage_problem({"model": "cmml", "extra": {"stage": "finetune"}}, cmml) is None
        True
        >>> print(stage_problem({"model": "cmml", "extra": {"stage": "pretrain"}}, cmml))
        it is from the 'pretrain' stage of cmml (stages: pretrain, finetune): its prediction heads were never trained
    """
    stage = payload.get("extra", {}).get("stage")
    stages = tuple(getattr(model, "stages", ()) or ())
    if stage is None or stage not in stages or stage == stages[-1]:
        return None
    return (f"it is from the {stage!r} stage of {payload.get('model', type(model).__name__)} "
            f"(stages: {', '.join(stages)}): its prediction heads were never trained")
