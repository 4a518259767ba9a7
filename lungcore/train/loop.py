"""The training loop: :func:`fit` (train + select + test), :func:`evaluate` and :func:`predict`.

One run writes into ``out``::

    config.yaml      the resolved TrainConfig           splits.json   row ids per split
    last.pt          resume state (end of the last finished epoch)
    best_<stage>.pt  best model of each stage (validation) best.pt     best model of the last stage
    metrics.csv      one row per epoch                   train.log     what happened, in order
    predictions_test.csv, report/ (PNG + summary.md)     tensorboard/  (if tensorboard is installed)

Every checkpoint carries the model config, the fitted cohort schema (category codes,
standardisation statistics) and the preprocessing settings, so :func:`evaluate` and
:func:`predict` code a new manifest exactly as training did. Checkpoints are read with
``torch.load(weights_only=True)``: loading one can never run code.

Resume (``resume=True``) continues from ``last.pt``: the interrupted epoch is redone, nothing
before it. Each epoch reseeds every RNG from (seed, stage, epoch), so a resumed run reproduces
an uninterrupted one exactly on CPU.

Example (a tiny CSF-Net on a tiny synthetic cohort; seconds):
    >>> import contextlib, io, tempfile
    >>> from lungcore.data import synth_cohort
    >>> from lungcore.train import evaluate, fit, predict
    >>> from lungcore.train.demo import CSFNET_SIZE    # CPU-sized widths; the cohort sets the rest
    >>> d = tempfile.mkdtemp()
    >>> cohort = synth_cohort("nodules", f"{d}/cohort", n=12, preset="tiny")["manifest"]
    >>> config = {"model": "csfnet", "model_overrides": CSFNET_SIZE, "progress": False}
    >>> with contextlib.redirect_stdout(io.StringIO()):   # fit logs each epoch
    ...     result = fit(config, manifest=cohort, out=f"{d}/run", epochs=1, batch_size=4)
    >>> result.best_checkpoint.name, "roc_auc" in result.test_metrics   # NaN when a split has one class
    ('best.pt', True)
    >>> frame = predict(result.best_checkpoint, cohort, f"{d}/probabilities.csv")
    >>> len(frame), list(frame.columns[:3])
    (12, ['id', 'patient_id', 'probability'])
    >>> metrics = evaluate(result.best_checkpoint, cohort)
    >>> sorted(k for k in metrics if k in ("roc_auc", "accuracy"))
    ['accuracy', 'roc_auc']
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungcore.train import distributed as dist_utils
from lungcore.train.config import OptimConfig, TrainConfig
from lungcore.train.resume import kill_point


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stopped and ``last.pt`` is the last good state."""


@dataclass
class FitResult:
    out: Path
    best_checkpoint: Path
    history: list[dict[str, Any]]
    test_metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the cohort could not teach or select on


# --------------------------------------------------------------------------------------------------
# helpers


def _device(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available (use --device cpu)")
    return cfg.device


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage_index * 10_007 + epoch) % 2**62


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _lr_multiplier(step: int, optim: OptimConfig, steps_per_epoch: int, total: int) -> float:
    """The ``optim.schedule`` multiplier of ``optim.lr`` at optimiser step ``step`` of a stage."""
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    if optim.schedule == "cosine":
        return _schedule(step, warmup, total, optim.min_lr_ratio)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    period = max(1, int(round(optim.restart_epochs * steps_per_epoch)))  # "restarts": one cosine per period
    return _schedule((step - warmup) % period, 0, period, optim.min_lr_ratio)


def _apply_recipe(cfg: TrainConfig, model: nn.Module) -> TrainConfig:
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


def _schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    # foreach: one multi-tensor update instead of a Python loop over the parameters (torch picks it on
    # CUDA only; on CPU the loop cost 70 ms a step for CMML's clinical branch)
    return cls(groups, lr=o.lr, betas=o.betas, foreach=True)


def _log(out: Path, message: str, echo: bool = True) -> None:
    if not dist_utils.is_main():
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(out / "train.log", "a") as f:
        f.write(f"{stamp} {message}\n")
        f.flush()
    if echo:
        print(message, flush=True)


def _warn(out: Path, message: str) -> None:
    """A loud warning: stderr and train.log (the report repeats it)."""
    import sys

    if not dist_utils.is_main():
        return
    _log(out, f"WARNING: {message}", echo=False)
    print(f"lungcore train: WARNING: {message}", file=sys.stderr, flush=True)


RUN_OUTPUTS = ("config.yaml", "splits.json", "last.pt", "best.pt", "metrics.csv", "train.log",
               "predictions_test.csv", "report", "tensorboard")


def _remove_previous_run(out: Path) -> None:
    """--overwrite: delete what a previous run wrote in ``out`` (its cache/ and other files stay)."""
    import shutil

    for p in out.iterdir() if out.is_dir() else ():
        if p.name in RUN_OUTPUTS or (p.name.startswith("best_") and p.suffix == ".pt"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _write_metrics_csv(out: Path, history: list[dict[str, Any]]) -> None:
    if not dist_utils.is_main():
        return
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(history)
    tmp.replace(out / "metrics.csv")


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class CohortData:
    manifest: Any
    schema: Any          # fitted CohortSchema
    settings: Any        # PreprocessSettings
    splits: dict[str, list[int]]
    cache_dir: Path | None
    verify: str = "stat"  # how the cache recognises a source image (DataConfig.verify)


def _load_manifest(path: str | Path, schema: Any = None):
    from lungcore.data import read_manifest

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    return read_manifest(path, schema)


def prepare_data(cfg: TrainConfig, out: Path, reuse_splits: bool = True) -> CohortData:
    """Read and validate the manifest, split it by patient, fit the schema on the training split.

    ``reuse_splits``: take the splits of ``out/splits.json`` when it exists (a resumed run).
    Writes nothing (:func:`_fit` writes ``splits.json`` once every check passed)."""
    from lungcore.data import PreprocessSettings, split_by_patient

    if not cfg.data.manifest:
        raise ValueError("no manifest: pass --manifest (or data.manifest in the config)")
    manifest = _load_manifest(cfg.data.manifest, cfg.data.schema)
    task_kind = manifest.schema.kind
    needed = {"survival": "survival", "classification": "nodules"}[_model_task(cfg.model)]
    if task_kind != needed:
        raise ValueError(f"model {cfg.model!r} trains on {needed!r} cohorts but {cfg.data.manifest} is a "
                         f"{task_kind!r} manifest")
    require_targets(manifest, cfg.data.manifest)
    if _model_needs_images(cfg.model) and all(p is None for row in manifest.images for p in row):
        raise ValueError(f"model {cfg.model!r} needs CT images, but every image cell of {cfg.data.manifest} "
                         f"(columns {', '.join(manifest.schema.image_columns)}) is empty")
    splits_file = out / "splits.json"
    if splits_file.is_file() and reuse_splits:  # a resumed run keeps its splits even if the split code changed
        by_id = json.loads(splits_file.read_text())
        index = {i: k for k, i in enumerate(manifest.ids)}
        missing = [i for ids in by_id.values() for i in ids if i not in index]
        if missing:
            raise ValueError(f"{splits_file} names ids absent from the manifest (e.g. {missing[:3]}); "
                             "use a fresh --out directory for a different cohort")
        splits = {name: [index[i] for i in ids] for name, ids in by_id.items()}
    else:
        splits = split_by_patient(manifest, cfg.data.split, seed=cfg.data.split_seed)
    if not splits["train"]:
        raise ValueError("the training split is empty: the cohort is too small for data.split")
    schema = manifest.subset(splits["train"]).fit_schema()
    defaults = PreprocessSettings.for_kind(task_kind).to_dict()
    settings = PreprocessSettings.from_dict({**defaults, **cfg.data.preprocess})
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    return CohortData(manifest, schema, settings, splits, cache, cfg.data.verify)


def require_targets(manifest: Any, path: Any, endpoints: Any = None) -> None:
    """Training and evaluation need labels, or at least one endpoint (of ``endpoints``, default the
    schema's) with data: name the columns that are missing or empty."""
    if manifest.schema.kind == "nodules":
        if manifest.label_mask is None or not manifest.label_mask.any():
            raise ValueError(f"manifest {path}: column {manifest.schema.label_column!r} is missing or empty; "
                             "training and evaluation need malignancy labels (predict does not)")
        return
    endpoints = list(manifest.schema.endpoints if endpoints is None else endpoints)
    if not any(manifest.endpoints[f"{e}_mask"].any() for e in endpoints if f"{e}_mask" in manifest.endpoints):
        cols = " or ".join(f"'{e}_time'/'{e}_event'" for e in endpoints) or "(the schema declares no endpoints)"
        raise ValueError(f"manifest {path}: columns {cols} are missing or empty; training and evaluation need "
                         "at least one endpoint (predict does not)")


def _dataset(data: CohortData, rows: list[int], augment: bool):
    from lungcore.data import Augmentation, CohortDataset, Preprocessor

    return CohortDataset(data.manifest.subset(rows), data.schema,
                         preprocessor=Preprocessor(data.settings, cache_dir=data.cache_dir, verify=data.verify),
                         augment=Augmentation() if augment else None)


def _fill_cache(data: CohortData, cfg: TrainConfig, rank: int, world: int) -> None:
    """Crop every CT of the cohort into the cache before the first epoch with ``lungcore preprocess``'s
    function and pool: this rank's shard over ``data.num_workers`` processes (in this process when
    0 or 1), so the loaders read crops only. A bad CT stops here, named by its manifest row."""
    from lungcore.data.preprocess import Preprocessor, preprocess_manifest

    if data.cache_dir is None:
        return
    preprocess_manifest(data.manifest, Preprocessor(data.settings, cache_dir=data.cache_dir), shard=(rank, world),
                        workers=max(1, cfg.data.num_workers), progress=cfg.progress and rank == 0)
    dist_utils.barrier()


def _model_task(name: str) -> str:
    from lungcore.models.registry import model_class

    return model_class(name).task


def _model_needs_images(name: str) -> bool:
    from lungcore.models.registry import model_class

    return bool(getattr(model_class(name), "needs_images", True))


# --------------------------------------------------------------------------------------------------
# one epoch


def _loader(dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int, drop_last: bool,
            distributed: bool):
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       num_workers=num_workers, drop_last=drop_last, generator=generator,
                                       persistent_workers=False)


def _train_epoch(wrapped: nn.Module, model: nn.Module, loader, stage: str, optimizer, lr_at, state: dict,
                 cfg: TrainConfig, device: torch.device, desc: str) -> dict[str, float]:
    from tqdm import tqdm

    accumulate = cfg.optim.accumulate
    wrapped.train()
    sums: dict[str, float] = {}
    count = 0
    samples = 0
    start = time.perf_counter()
    n_batches = len(loader)
    total = len(loader) * loader.batch_size if loader.drop_last else len(loader.sampler)
    bar = tqdm(total=total, desc=desc, unit="sample",
               disable=not (cfg.progress and dist_utils.is_main()), leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        batch = _to_device(batch, device)
        last_of_group = (i + 1) % accumulate == 0 or i + 1 == n_batches
        # a short last group (n_batches not a multiple of accumulate) averages over its own size
        group_size = min(accumulate, n_batches - (i // accumulate) * accumulate)
        with dist_utils.no_sync(wrapped, skip=not last_of_group), _autocast(device, cfg.precision):
            loss, logs = wrapped(batch, stage)
            finite = bool(torch.isfinite(loss.detach()).all())
            if dist_utils.all_true(finite, device):
                (loss.float() / group_size).backward()
        if not dist_utils.all_true(finite, device):
            bar.close()
            ids = batch.get("id", [])
            last_pt = state["out"] / "last.pt"
            then = (f"The last good checkpoint is {last_pt}: lower the learning rate (optim.lr) or check the "
                    "inputs, then rerun with --resume" if last_pt.is_file() else
                    "No checkpoint was written yet (this was before the end of the first epoch), so there is "
                    "nothing to resume: lower the learning rate (optim.lr) or check the inputs, then start "
                    "again with --overwrite")
            raise NonFiniteLossError(
                f"the {stage} loss became {loss.detach().float().item()} at epoch {state['epoch'] + 1}, batch "
                f"{i + 1}/{n_batches} (ids {list(ids)[:4]}...); stopped. {then}")
        if last_of_group:
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(state["step"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            kill_point()
        n = int(batch["clinical"].shape[0])
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
    out = {f"train_{k}": v / max(count, 1) for k, v in sums.items()}
    _, world = dist_utils.world()
    out["samples_per_s"] = samples * world / max(seconds, 1e-9)
    out["epoch_seconds"] = seconds
    return out


@torch.no_grad()
def run_predictions(model: nn.Module, loader, device: torch.device, precision: str = "auto",
                    stage: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Per-sample outputs of ``model.predict`` over a loader (+ the mean of ``model.loss`` if ``stage``)."""
    from tqdm import tqdm

    model.eval()
    outputs: dict[str, list[np.ndarray]] = {}
    ids: list[str] = []
    targets: dict[str, list[np.ndarray]] = {}
    losses = []
    with dist_utils.cross_rank_cox(model, False):
        for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
            batch = _to_device(batch, device)
            with _autocast(device, precision):
                pred = model.predict(batch)
                if stage is not None:
                    loss, _ = model.loss(batch, stage)
                    losses.append(float(loss.float()))
            for k, v in pred.items():
                outputs.setdefault(k, []).append(v.detach().float().cpu().numpy())
            for k in ("pfs_time", "pfs_event", "pfs_mask", "os_time", "os_event", "os_mask", "label", "label_mask"):
                if k in batch:
                    targets.setdefault(k, []).append(batch[k].detach().cpu().numpy())
            ids += list(batch["id"])
    result: dict[str, Any] = {"id": ids}
    result.update({k: np.concatenate(v) for k, v in outputs.items()})
    result.update({k: np.concatenate(v) for k, v in targets.items()})
    if stage is not None:
        result["loss"] = float(np.mean(losses)) if losses else math.nan
    return result


def validation_metrics(task: str, pred: dict[str, Any]) -> dict[str, float]:
    """The per-epoch validation metrics: C-index per endpoint (and their mean), or ROC AUC etc."""
    from lungcore import metrics

    out: dict[str, float] = {}
    if task == "survival":
        values = []
        for e in ("pfs", "os"):
            if e not in pred or f"{e}_time" not in pred:
                continue
            m = pred[f"{e}_mask"].astype(bool)
            try:
                c = float(metrics.concordance_index(pred[e][m], pred[f"{e}_time"][m], pred[f"{e}_event"][m]))
            except ValueError:
                c = math.nan
            out[f"{e}_cindex"] = c
            if math.isfinite(c):
                values.append(c)
        out["cindex"] = float(np.mean(values)) if values else math.nan
    else:
        m = pred["label_mask"].astype(bool)
        try:
            out.update(metrics.classification_metrics(pred["label"][m], pred["probability"][m]))
        except ValueError:
            out["roc_auc"] = math.nan
    return out


# --------------------------------------------------------------------------------------------------
# checkpoints


def _extra(data: CohortData, cfg: TrainConfig, stage: str, **more: Any) -> dict[str, Any]:
    return {"schema": data.schema.to_dict(), "preprocess": data.settings.to_dict(), "train_config": cfg.to_dict(),
            "stage": stage, "task": _model_task(cfg.model), **more}


def _save(model: nn.Module, path: Path, extra: dict[str, Any]) -> None:
    from lungcore.models.registry import save_model

    if dist_utils.is_main():
        save_model(model, path, extra)
    dist_utils.barrier()


# --------------------------------------------------------------------------------------------------
# fit


def _resolve_config(config: TrainConfig | dict | str | os.PathLike | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is None:
        cfg = TrainConfig()
    elif isinstance(config, TrainConfig):
        cfg = TrainConfig.from_dict(config.to_dict())
    elif isinstance(config, dict):
        cfg = TrainConfig.from_dict(config)
    else:
        cfg = TrainConfig.from_yaml(config)
    d = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("manifest", "schema", "batch_size", "num_workers", "cache_dir", "verify"):
            d["data"][key] = value
        elif key in ("lr", "accumulate"):
            d["optim"][key] = value
        elif key in d:
            d[key] = value
        else:
            raise ValueError(f"fit(): unknown override {key!r}")
    return TrainConfig.from_dict(d)


def fit(config: TrainConfig | dict | str | os.PathLike | None = None, *, out: str | os.PathLike,
        resume: bool = False, overwrite: bool = False, **overrides: Any) -> FitResult:
    """Train ``config.model`` on ``config.data.manifest``; select on validation; test the best model.

    ``config``: a :class:`TrainConfig`, its dict form, or a YAML path; ``overrides``: ``manifest``,
    ``model``, ``epochs``, ``batch_size``, ``lr``, ``accumulate``, ``device``, ``stage``, ``seed``,
    ``precision``, ``patience``, ``progress``, ``recipe`` ... (None leaves the config's value). Stages of the
    model run in order (``config.stage`` picks one); each starts from the previous stage's best
    model. Returns the best checkpoint and the test metrics.

    ``resume``: continue the run in ``out`` with the config it was started with
    (:mod:`lungcore.train.resume`: a contradicting override is an error). ``overwrite``: replace a
    previous run in ``out`` (without it a non-empty ``out`` is refused). Every image the run uses
    is read before the first step (:mod:`lungcore.train.preflight`); nothing in ``out`` is written
    before these checks pass.

    Example (runs as a doctest in the module docstring)::

        result = fit(model="cmml", manifest="cohort/manifest.csv", out="runs/cmml", epochs=20)
    """
    if resume:
        from lungcore.train.resume import resume_config

        cfg, _ = resume_config(out, config, overrides)
    else:
        cfg = _resolve_config(config, overrides)
    _quiet_readers()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _fit(cfg, Path(out), resume, lr_override=overrides.get("lr"), overwrite=overwrite)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _fit(cfg: TrainConfig, out: Path, resume: bool, lr_override: float | None = None,
         overwrite: bool = False) -> FitResult:
    from lungcore.train import preflight
    from lungcore.train import resume as resuming
    from lungcore.usage import out_folder

    out = Path(out)
    if not resume:
        if (out / "last.pt").is_file() and not overwrite:
            raise FileExistsError(f"{out} already holds a run (last.pt): pass --resume to continue it, --overwrite "
                                  "to replace it, or use a fresh --out")
        out_folder(out, "--out", overwrite=overwrite, ignore=("cache",))
    device_name = _device(cfg)
    distributed = dist_utils.init_from_env(device_name)
    device = dist_utils.local_device(device_name)
    rank, world = dist_utils.world()
    if cfg.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    from lungcore.models.registry import create, load_model, model_class, read_checkpoint

    cls = model_class(cfg.model)  # unknown model name -> clear ValueError before any work
    stages = list(cls.stages)
    if cfg.stage not in ("all", "both"):
        if cfg.stage not in stages:
            raise ValueError(f"stage {cfg.stage!r} is not a stage of {cfg.model!r}; stages: {stages} or 'all'")
        stages = [cfg.stage]

    last = out / "last.pt"
    trainer: dict[str, Any] | None = None
    if resume:  # fit() checked the flags against last.pt (resume_config)
        payload = read_checkpoint(last)
        trainer = payload["extra"]["trainer"]

    data = prepare_data(cfg, out, reuse_splits=resume)
    task = cls.task
    _seed_all(cfg.seed)
    model = create(cfg.model, **cls.config_from_cohort(data.schema, data.settings, cfg.model_overrides)).to(device)
    if cfg.recipe == "paper" and not resume:  # a resumed run's saved config has the recipe applied
        cfg = _apply_recipe(cfg, model)
        if lr_override is not None:  # an explicit rate (fit(lr=...), --lr) beats the paper's
            cfg.optim.lr = float(lr_override)
    if trainer is not None:
        model.load_state_dict(payload["state_dict"])
    # every image the run will use is read (or found in the cache) before anything is written
    used = sorted({i for rows in data.splits.values() for i in rows})
    preflight.read_every_image(data.manifest, used, data.settings, data.cache_dir, verify=data.verify,
                               progress=bool(cfg.progress and rank == 0))
    warnings = preflight.learnability(task, data.manifest, data.splits)

    # -- the checks passed: from here on the run folder changes --------------------------------------
    if rank == 0:
        if overwrite and not resume:
            _remove_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        resuming.clean_partial_writes(out)
        cfg.save_yaml(out / "config.yaml")
        if not resume or not (out / "splits.json").is_file():
            (out / "splits.json").write_text(json.dumps(
                {k: [data.manifest.ids[i] for i in v] for k, v in data.splits.items()}, indent=0) + "\n")
        if cfg.recipe == "paper" and not resume:
            _log(out, f"recipe 'paper': optim {cfg.optim}")
        for w in warnings:
            _warn(out, w)
    dist_utils.barrier()

    history: list[dict[str, Any]] = list(trainer["history"]) if trainer else []
    start_stage = trainer["stage_index"] if trainer else 0
    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except Exception:
            writer = None

    _log(out, f"lungcore train: model {cfg.model} ({sum(p.numel() for p in model.parameters()):,} parameters), "
              f"stages {stages}, device {device}, world size {world}, precision {cfg.precision}, "
              f"splits " + ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()))
    no_ct = sum(all(p is None for p in row) for row in data.manifest.images)
    if no_ct:
        _log(out, f"{no_ct} of {len(data.manifest)} rows without a CT" + (
            f": {cfg.model} trains its clinical branch alone (no CT encoder work)" if no_ct == len(data.manifest)
            else " (their CT tokens are masked)"))
    if task == "survival":
        _log(out, f"endpoints: {', '.join(data.schema.endpoints)}")
    datasets = {"train": _dataset(data, data.splits["train"], cfg.data.augment),
                "val": _dataset(data, data.splits["val"], False),
                "test": _dataset(data, data.splits["test"], False)}
    _fill_cache(data, cfg, rank, world)
    eval_bs = cfg.data.eval_batch_size or cfg.data.batch_size

    for si in range(start_stage, len(stages)):
        stage = stages[si]
        epochs = cfg.epochs_for(stage)
        is_last_stage = si == len(stages) - 1
        pretraining = stage == "pretrain"
        monitor = cfg.monitor if cfg.monitor != "auto" else (
            "val_loss" if pretraining else ("val_cindex" if task == "survival" else "val_roc_auc"))
        if monitor != "val_loss" and len(datasets["val"]) and not preflight.metric_defined(
                task, data.manifest, data.splits["val"]):
            monitor = "val_loss"  # the metric is undefined on this validation split (warned above)
        lower_is_better = monitor.endswith("loss")
        optimizer = _optimizer(model, cfg)
        resuming_here = trainer is not None and si == trainer["stage_index"]
        if resuming_here:
            optimizer.load_state_dict(trainer["optimizer"])
            state = {"epoch": trainer["epoch"], "step": trainer["step"], "best": trainer["best"],
                     "best_epoch": trainer["best_epoch"], "bad": trainer["bad"], "done": trainer["done"],
                     "out": out}
            if state["done"] or state["epoch"] >= epochs:
                _log(out, f"resuming {out}: stage {stage} is trained ({state['epoch']}/{epochs} epochs); "
                          "finishing the run")
            else:
                _log(out, f"resuming {out} at stage {stage} epoch {state['epoch'] + 1}/{epochs}"
                          f" (step {state['step']})")
        else:
            if si > 0:
                prev = out / f"best_{stages[si - 1]}.pt"
                if prev.is_file():
                    model.load_state_dict(read_checkpoint(prev)["state_dict"])
            state = {"epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad": 0, "done": False, "out": out}
        _seed_all(_epoch_seed(cfg.seed, si, -1))
        wrapped = dist_utils.wrap(model, device)
        train_ds = datasets["train"]
        per_rank = math.ceil(len(train_ds) / world)
        drop_last = per_rank > cfg.data.batch_size
        steps_per_epoch = max(1, math.ceil((per_rank // cfg.data.batch_size if drop_last else
                                            math.ceil(per_rank / cfg.data.batch_size)) / cfg.optim.accumulate))
        total = steps_per_epoch * epochs

        def lr_at(step: int, _s=steps_per_epoch, _t=total) -> float:
            return cfg.optim.lr * _lr_multiplier(step, cfg.optim, _s, _t)

        val_loader = _loader(datasets["val"], eval_bs, shuffle=False, seed=0, num_workers=cfg.data.num_workers,
                             drop_last=False, distributed=False)
        while not state["done"] and state["epoch"] < epochs:
            epoch = state["epoch"]
            seed = _epoch_seed(cfg.seed, si, epoch)
            _seed_all(seed + rank)
            _log(out, f"stage {stage} epoch {epoch + 1}/{epochs} start", echo=False)
            loader = _loader(train_ds, cfg.data.batch_size, shuffle=True, seed=seed,
                             num_workers=cfg.data.num_workers, drop_last=drop_last, distributed=distributed)
            if distributed:
                loader.sampler.set_epoch(epoch)
            with dist_utils.cross_rank_cox(model, distributed):
                row = _train_epoch(wrapped, model, loader, stage, optimizer, lr_at, state, cfg, device,
                                   desc=f"{stage} {epoch + 1}/{epochs}")
            row = {"stage": stage, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **row}
            if rank == 0 and len(datasets["val"]):
                pred = run_predictions(model, val_loader, device, cfg.precision, stage=stage)
                row["val_loss"] = pred["loss"]
                if not pretraining:
                    row.update({f"val_{k}": v for k, v in validation_metrics(task, pred).items()})
            value = row.get(monitor, math.nan)
            value = _broadcast(value, device)
            improved = math.isfinite(value) and (state["best"] is None or (
                value < state["best"] if lower_is_better else value > state["best"]))
            if state["best"] is None and not math.isfinite(value):
                improved = True  # no validation data: keep the latest
            if improved:
                state["best"], state["best_epoch"], state["bad"] = (value if math.isfinite(value) else None,
                                                                    epoch + 1, 0)
            else:
                state["bad"] += 1
            state["epoch"] = epoch + 1
            if cfg.patience and state["bad"] >= cfg.patience:
                state["done"] = True
            row["best_epoch"] = state["best_epoch"]
            history.append(row)
            extra = _extra(data, cfg, stage, epoch=epoch + 1, metrics=_plain(row))
            if improved:
                _save(model, out / f"best_{stage}.pt", extra)
            trainer_state = {"stage_index": si, "epoch": state["epoch"], "step": state["step"], "best": state["best"],
                             "best_epoch": state["best_epoch"], "bad": state["bad"], "done": state["done"],
                             "optimizer": optimizer.state_dict(), "history": [_plain(h) for h in history]}
            _save(model, last, {**extra, "trainer": trainer_state})
            _write_metrics_csv(out, history)
            if writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(f"{stage}/{k}", v, epoch + 1)
            _log(out, f"stage {stage} epoch {epoch + 1}/{epochs} end: " + ", ".join(
                f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)) +
                (" (best)" if improved else ""))
            if state["done"]:
                _log(out, f"early stop: {monitor} did not improve for {cfg.patience} epochs "
                          f"(best epoch {state['best_epoch']})")
        # next stage starts from this stage's best model; mark the stage finished in last.pt
        best_stage = out / f"best_{stage}.pt"
        if best_stage.is_file():
            model.load_state_dict(read_checkpoint(best_stage)["state_dict"])
        if not is_last_stage:
            trainer_state = {"stage_index": si + 1, "epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad": 0,
                             "done": False, "optimizer": _optimizer(model, cfg).state_dict(),
                             "history": [_plain(h) for h in history]}
            _save(model, last, {**_extra(data, cfg, stages[si + 1]), "trainer": trainer_state})
        trainer = None

    best = out / "best.pt"
    if rank == 0:
        import shutil

        shutil.copyfile(out / f"best_{stages[-1]}.pt", best)
    dist_utils.barrier()
    if writer is not None:
        writer.close()

    test_metrics: dict[str, float] = {}
    if rank == 0 and len(datasets["test"]):
        best_model, _ = load_model(best)
        best_model.to(device)
        test_metrics = _test_and_report(best_model, task, data, datasets, cfg, device, out, history, warnings)
        _log(out, "test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()
                                       if isinstance(v, float) and not k.endswith(("_low", "_high"))))
    if rank == 0:
        resuming.mark_finished(last)  # a later --resume says the run is finished
    return FitResult(out=out, best_checkpoint=best, history=history, test_metrics=test_metrics,
                     warnings=warnings)


def _quiet_readers() -> None:
    """MONAI's DICOM reader warns once per series that nvImageCodec is absent: noise, not news."""
    import logging

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def _broadcast(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in row.items()}


def _test_and_report(model, task, data: CohortData, datasets, cfg: TrainConfig, device, out: Path,
                     history, warnings: list[str] = ()) -> dict[str, float]:
    from lungcore.models.registry import read_checkpoint, save_model
    from lungcore.train.report import write_predictions, write_report

    bs = cfg.data.eval_batch_size or cfg.data.batch_size
    test = run_predictions(model, _loader(datasets["test"], bs, shuffle=False, seed=0, num_workers=cfg.data.num_workers,
                                          drop_last=False, distributed=False), device, cfg.precision)
    reference = None
    if task == "survival":
        train_eval = _dataset(data, data.splits["train"], False)
        reference = run_predictions(model, _loader(train_eval, bs, shuffle=False, seed=0,
                                                   num_workers=cfg.data.num_workers, drop_last=False,
                                                   distributed=False), device, cfg.precision)
        if hasattr(model, "fit_baseline"):  # Breslow baseline of the training split, saved in best.pt
            keys = [k for k in reference if k[:3] in ("pfs", "os_") or k in ("pfs", "os")]
            model.fit_baseline({e: torch.as_tensor(reference[e]) for e in ("pfs", "os") if e in reference},
                               {k: torch.as_tensor(reference[k]) for k in keys})
            payload = read_checkpoint(out / "best.pt")
            save_model(model, out / "best.pt", {**payload["extra"], "baseline": "breslow (training split)"})
    patients = {i: p for i, p in zip(data.manifest.ids, data.manifest.patient_ids)}
    test["patient_id"] = [patients[i] for i in test["id"]]
    write_predictions(test, task, out / "predictions_test.csv")
    return write_report(out / "report", task, test, reference=reference, history=history,
                        title=f"{cfg.model} — test split ({len(test['id'])} samples)", warnings=warnings)


# --------------------------------------------------------------------------------------------------
# evaluate / predict on a new manifest


def _from_checkpoint(checkpoint: str | os.PathLike, manifest: str | os.PathLike, batch_size: int, device: str | None,
                     num_workers: int = 0, cache_dir: str | os.PathLike | None = None):
    from lungcore.data import CohortDataset, CohortSchema, PreprocessSettings
    from lungcore.data.schema import schema_beside
    from lungcore.models.registry import load_model, read_checkpoint
    from lungcore.train.preflight import read_every_image
    from lungcore.usage import UsageError
    from lungcore.usage import device as check_device

    _quiet_readers()
    check_device(device)
    payload = read_checkpoint(checkpoint)
    extra = payload.get("extra", {})
    if "schema" not in extra or "preprocess" not in extra:
        raise ValueError(f"checkpoint {checkpoint} lacks the cohort schema / preprocessing settings "
                         "(was it written by lungcore train?)")
    try:
        schema = CohortSchema.from_dict(extra["schema"])
        settings = PreprocessSettings.from_dict(extra["preprocess"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {checkpoint}: its schema / preprocessing settings are invalid ({exc})") from None
    model, _ = load_model(checkpoint)  # a wrong shape / unknown model / unknown field: ValueError naming the file
    own = schema_beside(manifest) if Path(manifest).is_file() else None
    if own is not None:
        try:
            kind = CohortSchema.load(own).kind
        except (ValueError, OSError):
            kind = schema.kind
        if kind != schema.kind:
            raise UsageError(f"--checkpoint {checkpoint} is a {payload['model']} model of {schema.kind!r} cohorts "
                             f"but --manifest {manifest} is a {kind!r} cohort ({own.name})")
    m = _load_manifest(manifest, schema)
    read_every_image(m, range(len(m)), settings, cache_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    ds = CohortDataset(m, schema, settings, cache_dir=cache_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    task = extra.get("task") or type(model).task
    return model, m, loader, task, dev, extra


def predict(checkpoint: str | os.PathLike, manifest: str | os.PathLike, out: str | os.PathLike | None = None, *,
            batch_size: int = 8, device: str | None = None, cache_dir: str | os.PathLike | None = None,
            overwrite: bool = False, progress: bool = False) -> Any:
    """Per-row predictions (risks per endpoint, or malignancy probability) as a pandas DataFrame
    (also written to ``out`` as CSV when given: an existing file only with ``overwrite``; checked
    before any work). The manifest is coded with the checkpoint's schema.

    Example (runs as a doctest in the module docstring)::

        frame = predict("runs/cmml/best.pt", "new_cohort/manifest.csv", "risks.csv")
    """
    from lungcore.train.report import predictions_frame
    from lungcore.usage import out_file

    if out is not None:
        out_file(out, "--out", overwrite=overwrite)
    model, m, loader, task, dev, _ = _from_checkpoint(checkpoint, manifest, batch_size, device, cache_dir=cache_dir)
    pred = run_predictions(model, loader, dev, progress=progress)
    patients = dict(zip(m.ids, m.patient_ids))
    pred["patient_id"] = [patients[i] for i in pred["id"]]
    frame = predictions_frame(pred, task)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(out)
    return frame


def evaluate(checkpoint: str | os.PathLike, manifest: str | os.PathLike, out: str | os.PathLike | None = None, *,
             batch_size: int = 8, device: str | None = None, reference_manifest: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None, overwrite: bool = False,
             progress: bool = False) -> dict[str, float]:
    """Metrics of a checkpoint on every row of a labelled manifest (+ a report folder at ``out``).

    For survival models the Breslow baseline and the censoring distribution come from
    ``reference_manifest`` (the training cohort) when given, else from the evaluated cohort.

    Example (runs as a doctest in the module docstring)::

        metrics = evaluate("runs/csf/best.pt", "external/manifest.csv", "runs/csf/external")
    """
    from lungcore.train.report import summary_metrics, write_report
    from lungcore.usage import out_folder

    if out is not None:  # checked before any work: an existing report is replaced only with overwrite
        out_folder(out, "--out", overwrite=overwrite)
    model, m, loader, task, dev, extra = _from_checkpoint(checkpoint, manifest, batch_size, device,
                                                          cache_dir=cache_dir)
    require_targets(m, manifest, getattr(model, "endpoints", None))
    pred = run_predictions(model, loader, dev, progress=progress)
    pred["patient_id"] = list(m.patient_ids)
    reference = None
    if task == "survival" and reference_manifest is not None:
        _, _, ref_loader, _, _, _ = _from_checkpoint(checkpoint, reference_manifest, batch_size, device,
                                                     cache_dir=cache_dir)
        reference = run_predictions(model, ref_loader, dev)
    if out is not None:
        return write_report(Path(out), task, pred, reference=reference, history=None,
                            title=f"{Path(checkpoint).name} on {Path(manifest).name}")
    return summary_metrics(task, pred, reference)
