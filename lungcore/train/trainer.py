"""The trainer of a run: :class:`Trainer` trains stage after stage from a
:class:`~lungcore.train.checkpoints.TrainerState` (fresh or resumed), epoch after epoch
(:func:`train_epoch`), selects each stage's best model on validation, stops early, writes the
checkpoints, metrics.csv and the log, and at the end the test report.

Each epoch reseeds every RNG from (seed, stage, epoch), so a resumed run reproduces an
uninterrupted one exactly on CPU. Example: :func:`lungcore.train.fit` (:mod:`lungcore.train.loop`).
"""
from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungcore import usage
from lungcore.train import distributed as dist_utils
from lungcore.train import schedule
from lungcore.train.checkpoints import TrainerState, checkpoint_extra, mark_finished, plain, save
from lungcore.train.cohort import CohortData, loader
from lungcore.train.config import TrainConfig
from lungcore.train.inference import (autocast, not_finite_line, not_finite_rows, report_test_split,
                                      run_predictions, to_device, validation_metrics)
from lungcore.train.resume import kill_point
from lungcore.train.runlog import log, write_metrics_csv


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stopped and ``last.pt`` is the last good state.

    Raised by :func:`lungcore.train.fit` before the optimiser step of the bad batch. The message
    names the stage, epoch, batch and its first ids, and what to do: lower ``optim.lr`` (or check
    the inputs) and rerun with ``--resume`` from ``last.pt``, or start again with ``--overwrite`` when
    the first epoch never finished. A ``RuntimeError``, not a ``ValueError``: the arguments were
    fine, the run diverged (``lungcore train`` exits 1, not 2).

    Example:
        >>> from lungcore.train import NonFiniteLossError
        >>> issubclass(NonFiniteLossError, RuntimeError), issubclass(NonFiniteLossError, ValueError)
        (True, False)
    """


@dataclass
class FitResult:
    """What :func:`lungcore.train.fit` returns (the files behind it stay in ``out``).

    ``out``: the run folder; ``best_checkpoint``: ``out/best.pt``, the last stage's best model on
    validation (what :func:`~lungcore.train.evaluate` and :func:`~lungcore.train.predict` take);
    ``history``: one dict per epoch of every stage (the rows of ``metrics.csv``); ``test_metrics``:
    the test split's metrics with their bootstrap ``_low``/``_high`` bounds (``report/metrics.json``;
    empty without a test split); ``warnings``: what the cohort could not teach or select on.
    A full run is the example of :mod:`lungcore.train.loop`.

    Example:
        >>> import dataclasses
        >>> [f.name for f in dataclasses.fields(FitResult)]
        ['out', 'best_checkpoint', 'history', 'test_metrics', 'warnings']
    """

    out: Path
    best_checkpoint: Path
    history: list[dict[str, Any]]
    test_metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the cohort could not teach or select on


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage_index * 10_007 + epoch) % 2**62


def _broadcast(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


# --------------------------------------------------------------------------------------------------
# one epoch


def _then(last_pt: Path) -> str:
    """What to do after a non-finite loss: the last good checkpoint, or that there is none yet."""
    return (f"The last good checkpoint is {last_pt}: lower the learning rate (optim.lr) or check the "
            f"inputs, then rerun with {usage.argument('--resume')}" if last_pt.is_file() else
            "No checkpoint was written yet (none is before the first epoch ends), so there is "
            "nothing to resume: lower the learning rate (optim.lr) or check the inputs, then start "
            f"again with {usage.argument('--overwrite')}")


def _non_finite(loss: torch.Tensor, batch: dict[str, Any], stage: str, epoch: int, batch_no: str,
                last_pt: Path) -> NonFiniteLossError:
    ids = batch.get("id", [])
    return NonFiniteLossError(f"the {stage} loss became {loss.detach().float().item()} at epoch {epoch}, batch "
                              f"{batch_no} (ids {list(ids)[:4]}...); stopped. {_then(last_pt)}")


# logs of model.loss that count samples (CSF-Net's "n": the labelled nodules of the batch): summed over the
# epoch and over the ranks (metrics.csv's train_n: the samples trained on in that epoch), not averaged per batch
COUNT_LOGS = ("n",)


def train_epoch(wrapped: nn.Module, model: nn.Module, batches, stage: str, optimizer, lr_at, state: TrainerState,
                cfg: TrainConfig, device: torch.device, desc: str, last_pt: Path) -> dict[str, float]:
    """One pass over ``batches``: an optimiser step every ``cfg.optim.accumulate`` batches at the
    rate ``lr_at(state.step)``; ``state.step`` counts them. Returns the epoch's train_* means over
    its batches (``train_<k>`` of a :data:`COUNT_LOGS` log ``k`` is the epoch's total over every
    rank instead), its throughput and time. A non-finite loss raises :class:`NonFiniteLossError`
    before its step."""
    from tqdm import tqdm

    accumulate = cfg.optim.accumulate
    wrapped.train()
    sums: dict[str, float] = {}
    count = samples = 0
    start = time.perf_counter()
    n_batches = len(batches)
    total = n_batches * batches.batch_size if batches.drop_last else len(batches.sampler)
    bar = tqdm(total=total, desc=desc, unit="sample",
               disable=not (cfg.progress and dist_utils.is_main()), leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        last_of_group = (i + 1) % accumulate == 0 or i + 1 == n_batches
        # a short last group (n_batches not a multiple of accumulate) averages over its own size
        group_size = min(accumulate, n_batches - (i // accumulate) * accumulate)
        with dist_utils.no_sync(wrapped, skip=not last_of_group), autocast(device, cfg.precision):
            loss, logs = wrapped(batch, stage)
            finite = bool(torch.isfinite(loss.detach()).all())
            if dist_utils.all_true(finite, device):
                (loss.float() / group_size).backward()
        if not dist_utils.all_true(finite, device):
            bar.close()
            raise _non_finite(loss, batch, stage, state.epoch + 1, f"{i + 1}/{n_batches}", last_pt)
        if last_of_group:
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            schedule.set_lr(optimizer, lr_at(state.step))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            kill_point()
        n = len(batch["id"])  # every collated batch carries one id per sample
        samples += n
        count += 1
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        for k, v in (logs or {}).items():
            if k != "loss":
                sums[k] = sums.get(k, 0.0) + float(v)
        bar.update(n)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    seconds = time.perf_counter() - start
    out = {f"train_{k}": v / max(count, 1) for k, v in sums.items() if k not in COUNT_LOGS}
    for k in COUNT_LOGS:
        if k in sums:
            out[f"train_{k}"] = int(round(sum(dist_utils.gather(sums[k]))))
    _, world = dist_utils.world()
    out["samples_per_s"] = samples * world / max(seconds, 1e-9)
    out["epoch_seconds"] = seconds
    return out


# --------------------------------------------------------------------------------------------------
# the trainer: stage after stage, epoch after epoch


@dataclass
class Trainer:
    """One run's training: the model, the cohort and its datasets, where it writes. Trains one stage
    at a time from a :class:`~lungcore.train.checkpoints.TrainerState` (fresh or resumed)."""

    cfg: TrainConfig
    out: Path
    model: nn.Module
    data: CohortData
    datasets: dict[str, Any]
    task: str
    stages: list[str]
    device: torch.device
    distributed: bool
    history: list[dict[str, Any]]
    writer: Any = None  # tensorboard SummaryWriter (main rank, when installed)
    val_failure: str | None = None  # this epoch's non-finite validation (main rank): the run stops on it

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    def log_start(self) -> None:
        cfg, data, out = self.cfg, self.data, self.out
        _, world = dist_utils.world()
        log(out, f"lungcore train: model {cfg.model} ({sum(p.numel() for p in self.model.parameters()):,} "
                 f"parameters), stages {self.stages}, device {self.device}, world size {world}, precision "
                 f"{cfg.precision}, splits " + ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()))
        no_ct = sum(all(p is None for p in row) for row in data.manifest.images)
        if no_ct:
            log(out, f"{no_ct} of {len(data.manifest)} rows without a CT" + (
                f": {cfg.model} trains its clinical branch alone (no CT encoder work)"
                if no_ct == len(data.manifest) else " (their CT tokens are masked)"))
        if self.task == "survival":
            log(out, f"endpoints: {', '.join(data.schema.endpoints)}")

    def monitor(self, stage: str) -> str:
        """The validation metric that selects ``stage``'s best model."""
        from lungcore.train import preflight

        cfg = self.cfg
        monitor = cfg.monitor if cfg.monitor != "auto" else (
            "val_loss" if stage == "pretrain" else ("val_cindex" if self.task == "survival" else "val_roc_auc"))
        if monitor != "val_loss" and len(self.datasets["val"]) and not preflight.metric_defined(
                self.task, self.data.manifest, self.data.splits["val"]):
            monitor = "val_loss"  # the metric is undefined on this validation split (warned at the start)
        return monitor

    def start_stage(self, si: int, resumed: TrainerState | None) -> tuple[TrainerState, torch.optim.Optimizer]:
        """The state and optimiser stage ``si`` starts from: ``resumed`` when it is in that stage,
        else a fresh state on the previous stage's best model."""
        stage, epochs = self.stages[si], self.cfg.epochs_for(self.stages[si])
        optimizer = schedule.optimizer(self.model, self.cfg)
        if resumed is not None and si == resumed.stage_index:
            saved = len(resumed.optimizer["param_groups"])
            if saved != len(optimizer.param_groups):
                raise ValueError(
                    f"cannot resume {self.out}: its optimiser state has {saved} parameter groups, this model and "
                    f"lungcore make {len(optimizer.param_groups)} (a run started by an earlier lungcore, before "
                    "CMML's T2G column embeddings got their own learning rate): resume it with the lungcore that "
                    "started it, or start a new run (model_overrides.graph_column_lr: null keeps one learning rate)")
            optimizer.load_state_dict(resumed.optimizer)
            state, state.finished = resumed, False
            if state.done or state.epoch >= epochs:
                log(self.out, f"resuming {self.out}: stage {stage} is trained ({state.epoch}/{epochs} epochs); "
                              "finishing the run")
            else:
                log(self.out, f"resuming {self.out} at stage {stage} epoch {state.epoch + 1}/{epochs}"
                              f" (step {state.step})")
            return state, optimizer
        prev = self.out / f"best_{self.stages[si - 1]}.pt"
        if si > 0 and prev.is_file():
            self._load(prev)
        return TrainerState(stage_index=si, history=self.history), optimizer

    def _load(self, checkpoint: Path) -> None:
        from lungcore.models.registry import read_checkpoint

        self.model.load_state_dict(read_checkpoint(checkpoint)["state_dict"])

    def run_stage(self, state: TrainerState, optimizer: torch.optim.Optimizer) -> None:
        """Train ``state``'s stage to its epoch count (or early stop); the model ends on its best epoch."""
        cfg, si = self.cfg, state.stage_index
        stage, epochs = self.stages[si], cfg.epochs_for(self.stages[si])
        _, world = dist_utils.world()
        seed_all(_epoch_seed(cfg.seed, si, -1))
        wrapped = dist_utils.wrap(self.model, self.device)
        steps, drop_last = schedule.steps_per_epoch(len(self.datasets["train"]), world, cfg.data.batch_size,
                                                    cfg.optim.accumulate)
        lr_at = schedule.stage_lr(cfg.optim, steps, epochs)

        val_batches = loader(self.datasets["val"], cfg.data.eval_batch_size or cfg.data.batch_size,
                             num_workers=cfg.data.num_workers)
        monitor = self.monitor(stage)
        while not state.done and state.epoch < epochs:
            row = self._epoch(state, optimizer, wrapped, lr_at, drop_last, val_batches)
            improved = self._select(state, row, monitor)
            self._record(state, row, improved, optimizer, monitor)
        # the next stage starts from this stage's best model; last.pt says this stage is finished
        best_stage = self.out / f"best_{stage}.pt"
        if best_stage.is_file():
            self._load(best_stage)
        if si < len(self.stages) - 1:
            save(self.model, self.last, checkpoint_extra(self.data, cfg, self.stages[si + 1]),
                 state.next_stage(schedule.optimizer(self.model, cfg).state_dict()))

    def _epoch(self, state: TrainerState, optimizer, wrapped: nn.Module, lr_at, drop_last: bool,
               val_batches) -> dict[str, Any]:
        cfg, stage = self.cfg, self.stages[state.stage_index]
        epochs = cfg.epochs_for(stage)
        rank, _ = dist_utils.world()
        seed = _epoch_seed(cfg.seed, state.stage_index, state.epoch)
        seed_all(seed + rank)
        log(self.out, f"stage {stage} epoch {state.epoch + 1}/{epochs} start", echo=False)
        # augmentation keyed by (epoch seed, sample): the same with any --num-workers and on resume
        self.datasets["train"].augment_seed = seed
        batches = loader(self.datasets["train"], cfg.data.batch_size, shuffle=True, seed=seed,
                         num_workers=cfg.data.num_workers, drop_last=drop_last, distributed=self.distributed)
        if self.distributed:
            batches.sampler.set_epoch(state.epoch)
        with dist_utils.cross_rank_cox(self.model, self.distributed):
            row = train_epoch(wrapped, self.model, batches, stage, optimizer, lr_at, state, cfg, self.device,
                              desc=f"{stage} {state.epoch + 1}/{epochs}", last_pt=self.last)
        row = {"stage": stage, "epoch": state.epoch + 1, "lr": optimizer.param_groups[0]["lr"], **row}
        self.val_failure = None
        if rank == 0 and len(self.datasets["val"]):
            try:
                pred = run_predictions(self.model, val_batches, self.device, cfg.precision, stage=stage)
            except ValueError as exc:  # a loss that refuses non-finite outputs (Cox: "risk must be finite")
                self.val_failure = self._validation_failure(stage, state.epoch + 1, val_batches, None, exc)
                row["val_loss"] = math.nan
                return row
            row["val_loss"] = pred["loss"]
            if not math.isfinite(pred["loss"]) or not_finite_rows(pred, self.task, self.data.manifest, self.data.schema):
                self.val_failure = self._validation_failure(stage, state.epoch + 1, val_batches, pred, None)
                return row
            if stage != "pretrain":
                row.update({f"val_{k}": v for k, v in validation_metrics(self.task, pred).items()})
            monitor = self.monitor(stage)
            if monitor in row and not math.isfinite(row[monitor]):
                self.val_failure = (f"the {stage} validation {monitor} became {row[monitor]} at epoch "
                                    f"{state.epoch + 1} although its loss and outputs are finite; stopped. "
                                    f"{_then(self.last)}")
        return row

    def _validation_failure(self, stage: str, epoch: int, val_batches, pred: dict[str, Any] | None,
                            exc: BaseException | None) -> str:
        """The message of a non-finite validation loss or output: which validation rows gave one (by
        row, id and the clinical value far out behind it, as ``predict`` names them), and the last
        good checkpoint. ``pred`` is None when the loss refused the outputs (``exc``): they are
        predicted once more, without the loss, to name the rows."""
        if pred is None:
            what = f"loss could not be computed ({exc})"
            pred = run_predictions(self.model, val_batches, self.device, self.cfg.precision)
        else:
            what = f"loss became {pred['loss']}" if not math.isfinite(pred["loss"]) else "outputs became non-finite"
        found = not_finite_rows(pred, self.task, self.data.manifest, self.data.schema)
        if not found and exc is not None:
            raise exc  # not a non-finite output: the error as it was
        where = ""
        if found:
            shown = "; ".join(not_finite_line(item) for item in found[:4])
            more = f"; and {len(found) - 4} more" if len(found) > 4 else ""
            where = f" (validation {shown}{more}: check their clinical values and images)"
        return f"the {stage} validation {what} at epoch {epoch}{where}; stopped. {_then(self.last)}"

    def _select(self, state: TrainerState, row: dict[str, Any], monitor: str) -> bool:
        """Model selection and early stopping after an epoch; appends ``row`` to the history."""
        failed = _broadcast(1.0 if self.val_failure else 0.0, self.device)  # the main rank validates
        if failed:  # a non-finite validation is never "best": the run stops, as for a non-finite loss
            raise NonFiniteLossError(self.val_failure or "the validation on rank 0 became non-finite; stopped "
                                     f"(its error says which rows). {_then(self.last)}")
        value = _broadcast(row.get(monitor, math.nan), self.device)
        lower_is_better = monitor.endswith("loss")
        improved = math.isfinite(value) and (state.best is None or (
            value < state.best if lower_is_better else value > state.best))
        if state.best is None and not math.isfinite(value):
            improved = True  # no validation data: keep the latest
        if improved:
            state.best, state.best_epoch, state.bad = value if math.isfinite(value) else None, state.epoch + 1, 0
        else:
            state.bad += 1
        state.epoch += 1
        if self.cfg.patience and state.bad >= self.cfg.patience:
            state.done = True
        row["best_epoch"] = state.best_epoch
        state.history.append(row)
        return improved

    def _record(self, state: TrainerState, row: dict[str, Any], improved: bool, optimizer, monitor: str) -> None:
        """Checkpoints, metrics.csv, tensorboard and the log line of a finished epoch."""
        stage, out = self.stages[state.stage_index], self.out
        extra = checkpoint_extra(self.data, self.cfg, stage, epoch=state.epoch, metrics=plain(row))
        if improved:
            save(self.model, out / f"best_{stage}.pt", extra)
        state.optimizer = optimizer.state_dict()
        save(self.model, self.last, extra, state)
        write_metrics_csv(out, state.history)
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(f"{stage}/{k}", v, state.epoch)
        log(out, f"stage {stage} epoch {state.epoch}/{self.cfg.epochs_for(stage)} end: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)) + (" (best)" if improved else ""))
        if state.done:
            log(out, f"early stop: {monitor} did not improve for {self.cfg.patience} epochs "
                     f"(best epoch {state.best_epoch})")

    def finish(self, warnings: list[str]) -> FitResult:
        """best.pt (the last stage's best), the test split's predictions and report, last.pt marked finished."""
        from lungcore.models.registry import load_model, model_class

        rank, _ = dist_utils.world()
        best = self.out / "best.pt"
        if rank == 0:
            shutil.copyfile(self.out / f"best_{self.stages[-1]}.pt", best)
        dist_utils.barrier()
        if self.writer is not None:
            self.writer.close()
        test_metrics: dict[str, float] = {}
        last_stage = tuple(model_class(self.cfg.model).stages)[-1]
        if rank == 0 and len(self.datasets["test"]) and self.stages[-1] != last_stage:
            # e.g. CMML --stage pretrain: the risk heads were never trained, their test metrics would mean nothing
            log(self.out, f"test: not scored: stage {self.stages[-1]!r} trains no prediction head (train the "
                          f"{last_stage!r} stage for test metrics: --stage {last_stage} from this run's best.pt, "
                          "or --stage all)")
        elif rank == 0 and len(self.datasets["test"]):
            best_model, _ = load_model(best)
            best_model.to(self.device)
            test_metrics = report_test_split(best_model, self.task, self.data, self.datasets, self.cfg, self.device,
                                             self.out, self.history, warnings)
            log(self.out, "test: " + ", ".join(f"{k} {v:.4f}" if math.isfinite(v) else f"{k} null"
                                               for k, v in test_metrics.items()
                                               if isinstance(v, float) and not k.endswith(("_low", "_high"))))
        if rank == 0:
            mark_finished(self.last)  # a later --resume says the run is finished
        return FitResult(out=self.out, best_checkpoint=best, history=self.history, test_metrics=test_metrics,
                         warnings=warnings)
