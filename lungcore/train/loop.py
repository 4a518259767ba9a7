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

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lungcore import usage
from lungcore.train import distributed as dist_utils
from lungcore.train import schedule
from lungcore.train.checkpoints import TrainerState
from lungcore.train.cohort import CohortData, prepare_data, split_datasets
from lungcore.train.config import ConfigError, TrainConfig
from lungcore.train.inference import quiet_readers
from lungcore.train.resume import OVERRIDE_PATHS, PATH_FIELDS, trainer_stages
from lungcore.train.runlog import log, remove_previous_run, warn
from lungcore.train.trainer import FitResult, Trainer, seed_all


def _device(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available (use --device cpu)")
    return cfg.device


# --------------------------------------------------------------------------------------------------
# fit


def _resolve_config(config: TrainConfig | dict | str | os.PathLike | None, overrides: dict[str, Any]) -> TrainConfig:
    # the model override first: the config's stage_epochs / model_overrides are checked against the
    # network that runs (a config without `model` may be written for --model csfnet); a stage_epochs
    # name it lacks is an error even where --epochs replaces them (a typo stays one)
    model = {"model": overrides["model"]} if overrides.get("model") is not None else {}
    if config is None:
        cfg = TrainConfig(**model)
    elif isinstance(config, TrainConfig):
        cfg = TrainConfig.from_dict({**config.to_dict(), **model})
    elif isinstance(config, dict):
        cfg = TrainConfig.from_dict({**config, **model})
    else:
        cfg = TrainConfig.from_yaml(config, **model)
    d = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        if key in OVERRIDE_PATHS:  # data.* and optim.* fields
            section, name = OVERRIDE_PATHS[key].split(".")
            d[section][name] = value
        elif key in d:
            d[key] = value
            if key == "epochs":  # epochs of every stage (--epochs): the config's stage_epochs give way
                d["stage_epochs"] = {}
        else:
            raise ValueError(f"fit(): unknown override {key!r}")
    for name in PATH_FIELDS:  # saved absolute: a run resumes (and is evaluated) from any directory
        if d["data"].get(name) is not None:
            d["data"][name] = os.path.abspath(d["data"][name])
    return TrainConfig.from_dict(d)


# TrainConfig field -> the flag of `lungcore train` that sets it (and, spelt as a keyword, the override of
# fit): a ConfigError on a field whose value the caller gave names what the caller wrote (usage.argument)
OVERRIDE_FLAGS = {"model": "--model", "data.manifest": "--manifest", "stage": "--stage", "epochs": "--epochs",
                  "data.batch_size": "--batch-size", "optim.accumulate": "--accumulate", "optim.lr": "--lr",
                  "device": "--device", "precision": "--precision", "seed": "--seed", "patience": "--patience",
                  "data.num_workers": "--num-workers", "data.verify": "--verify", "recipe": "--recipe",
                  "data.augment": "--augment"}


def fit(config: TrainConfig | dict | str | os.PathLike | None = None, *, out: str | os.PathLike,
        resume: bool = False, overwrite: bool = False, **overrides: Any) -> FitResult:
    """Train ``config.model`` on ``config.data.manifest``; select on validation; test the best model.

    ``config``: a :class:`TrainConfig`, its dict form, or a YAML path; ``overrides``: ``manifest``,
    ``model``, ``epochs``, ``batch_size``, ``lr``, ``accumulate``, ``device``, ``stage``, ``seed``,
    ``precision``, ``patience``, ``progress``, ``recipe``, ``augment`` ... (None leaves the config's value; an
    override beats the config: ``epochs`` is the epoch count of every stage, the config's
    ``stage_epochs`` included). Stages of the
    model run in order (``config.stage`` picks one); each starts from the previous stage's best
    model. Returns the best checkpoint and the test metrics.

    ``resume``: continue the run in ``out`` with the config it was started with
    (:mod:`lungcore.train.resume`: a contradicting override is an error). ``overwrite``: replace a
    previous run in ``out`` (without it a non-empty ``out`` is refused). Every image the run uses
    is read before the first step (:mod:`lungcore.train.preflight`); nothing in ``out`` is written
    before these checks pass.

    Example: see the module docstring (a tiny CSF-Net trained on a tiny synthetic cohort); in short::

        result = fit(model="cmml", manifest="cohort/manifest.csv", out="runs/cmml", epochs=20)
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if resume:
            from lungcore.train.resume import resume_config

            cfg, _ = resume_config(out, config, overrides)
        else:
            cfg = _resolve_config(config, overrides)
        quiet_readers()
        return _fit(cfg, Path(out), resume, lr_override=overrides.get("lr"), overwrite=overwrite)
    except ConfigError as exc:
        flag = OVERRIDE_FLAGS.get(exc.field)
        if flag is not None and overrides.get(flag[2:].replace("-", "_")) is not None:
            # the caller gave the bad value: name what they wrote (--batch-size / batch_size), not the field
            raise usage.UsageError(f"{usage.argument(flag)} {exc.problem}") from exc
        # a config field the network refused (model_overrides, data.preprocess): name the file that gave it
        if isinstance(config, (str, os.PathLike)) and exc.field.startswith(("model_overrides", "data.")):
            raise ValueError(f"config file {config}: {exc}") from None
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _build_model(cfg: TrainConfig, data: CohortData, device: torch.device, resume: bool,
                 lr_override: float | None, payload: dict[str, Any] | None) -> tuple[TrainConfig, nn.Module]:
    """The model sized by the cohort (its weights from ``payload`` when resuming), and the config with
    the paper's recipe applied (a resumed run's saved config has it already)."""
    from lungcore.models.registry import create, model_class

    seed_all(cfg.seed)
    cls = model_class(cfg.model)
    try:
        config = cls.config_from_cohort(data.schema, data.settings, cfg.model_overrides)
    except ValueError as exc:  # a contradiction names its fields: "model_overrides.img_size = ... contradicts ..."
        name, _, problem = str(exc).partition(" ")
        if name.startswith(("model_overrides", "data.preprocess")) and problem:
            raise ConfigError(name, problem) from None
        raise
    try:
        model = create(cfg.model, **config)
    except (TypeError, ValueError) as exc:
        if not cfg.model_overrides:
            raise
        raise ConfigError("model_overrides", f"do not make a valid {cfg.model} network: {exc}") from None
    model = model.to(device)
    if cfg.recipe == "paper" and not resume:
        cfg = schedule.apply_recipe(cfg, model)
        if lr_override is not None:  # an explicit rate (fit(lr=...), --lr) beats the paper's
            cfg.optim.lr = float(lr_override)
    if payload is not None:
        model.load_state_dict(payload["state_dict"])
    return cfg, model


def _start_run_folder(cfg: TrainConfig, out: Path, data: CohortData, warnings: list[str], resume: bool,
                      overwrite: bool) -> None:
    """The checks passed: from here on the run folder changes (config.yaml, splits.json, warnings)."""
    from lungcore.train.resume import clean_partial_writes

    if dist_utils.is_main():
        if overwrite and not resume:
            remove_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        clean_partial_writes(out)
        cfg.save_yaml(out / "config.yaml")
        if not resume or not (out / "splits.json").is_file():
            (out / "splits.json").write_text(json.dumps(
                {k: [data.manifest.ids[i] for i in v] for k, v in data.splits.items()}, indent=0) + "\n")
        if cfg.recipe == "paper" and not resume:
            log(out, f"recipe 'paper': optim {cfg.optim}")
        for w in warnings:
            warn(out, w)
    dist_utils.barrier()


def _tensorboard(out: Path) -> Any:
    if not dist_utils.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tensorboard"))
    except Exception:
        return None


def _fit(cfg: TrainConfig, out: Path, resume: bool, lr_override: float | None = None,
         overwrite: bool = False) -> FitResult:
    from lungcore.models.registry import model_class
    from lungcore.train import preflight
    from lungcore.usage import out_folder

    out = Path(out)
    if not resume:
        if (out / "last.pt").is_file() and not overwrite:
            arg = usage.argument
            raise usage.UsageError(f"{out} already holds a run (last.pt): pass {arg('--resume')} to continue it, "
                                   f"{arg('--overwrite')} to replace it, or use a fresh {arg('--out')}")
        out_folder(out, "--out", overwrite=overwrite, ignore=("cache",))
    device_name = _device(cfg)
    distributed = dist_utils.init_from_env(device_name)
    device = dist_utils.local_device(device_name)
    rank, _ = dist_utils.world()
    if cfg.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    stages = trainer_stages(cfg)  # unknown model or stage -> clear ValueError before any work
    resumed, payload = TrainerState.read(out / "last.pt") if resume else (None, None)  # fit() checked it
    data = prepare_data(cfg, out, reuse_splits=resume)
    task = model_class(cfg.model).task
    cfg, model = _build_model(cfg, data, device, resume, lr_override, payload)
    # every image the run will use is read once, checked and cropped into the cache (this rank's
    # shard, over the data workers), before the run folder is written; a bad image stops the run here
    used = sorted({i for rows in data.splits.values() for i in rows})
    preflight.read_every_image(data.manifest, used, data.settings, data.cache_dir, verify=data.verify,
                               progress=bool(cfg.progress and rank == 0), fill=True,
                               workers=max(1, cfg.data.num_workers))
    warnings = preflight.learnability(task, data.manifest, data.splits)
    _start_run_folder(cfg, out, data, warnings, resume, overwrite)

    trainer = Trainer(cfg, out, model, data, split_datasets(data, cfg.data.augment), task, stages, device,
                      distributed, resumed.history if resumed else [], _tensorboard(out))
    trainer.log_start()
    for si in range(resumed.stage_index if resumed else 0, len(stages)):
        trainer.run_stage(*trainer.start_stage(si, resumed))
    return trainer.finish(warnings)
