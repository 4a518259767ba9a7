"""Training configuration: dataclasses whose fields map 1:1 onto a YAML file.

A YAML file holds the fields of :class:`TrainConfig`; its nested sections ``data`` and ``optim``
hold the fields of :class:`DataConfig` and :class:`OptimConfig`, and ``model_overrides`` is passed
to ``lungcore.models.create(model, **model_overrides)``. Unknown keys are errors (a typo never
silently trains with a default), in ``data.preprocess``, ``model_overrides`` and ``stage_epochs``
too (a ``stage_epochs`` name must be a stage of ``model``, whether the config is a file, a dict or
a :class:`TrainConfig`). Command-line flags override the file (``--epochs`` its ``epochs`` and
``stage_epochs``, ``--model`` its ``model``). A field with a value it cannot take is a
:class:`ConfigError` naming the field (``data.batch_size must be an integer >= 1, got 0``);
``lungcore train`` names the flag instead when a flag gave the value.

Example:
    >>> from lungcore.train.config import TrainConfig
    >>> cfg = TrainConfig.from_dict({"model": "csfnet", "epochs": 3, "optim": {"lr": 1e-3}})
    >>> cfg.optim.lr, cfg.data.batch_size, TrainConfig.from_dict(cfg.to_dict()) == cfg
    (0.001, 8, True)
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungcore import usage


class ConfigError(ValueError):
    """A config field holds a value it cannot take. ``field``: its dotted name (``data.batch_size``);
    ``problem``: what is wrong (``must be an integer >= 1, got 0``); ``str()`` is both."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _integer(field: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (3.0 is 3), at least ``minimum``; else a :class:`ConfigError`."""
    if not usage.is_integer(value, minimum):
        raise ConfigError(field, f"must be an integer{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    return int(value)


def _boolean(field: str, value: Any) -> bool:
    """``value`` if it is a bool (YAML's ``true`` / ``false``; :func:`lungcore.usage.is_boolean`); else a
    :class:`ConfigError`: a string such as ``"false"`` or ``"off"`` is truthy in Python and would
    silently mean on."""
    if not usage.is_boolean(value):
        raise ConfigError(field, f"must be true or false, got {value!r}")
    return bool(value)


def _number(field: str, value: Any, rule: str) -> float:
    """``value`` as a finite float obeying ``rule`` (``"> 0"``, ``">= 0"``, ``"in [0, 1]"``,
    ``"in [0, 1)"``); else a :class:`ConfigError` saying the rule. A string that reads as a number
    is one (YAML reads ``1e-3``, without a dot, as a string)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = {"> 0": v > 0, ">= 0": v >= 0, "in [0, 1]": 0 <= v <= 1, "in [0, 1)": 0 <= v < 1}[rule]
    if not ok:
        raise ConfigError(field, f"must be a number {rule}, got {value!r}")
    return float(value)


@dataclass
class OptimConfig:
    """Optimiser and schedule: AdamW, linear warm-up then cosine decay to ``lr * min_lr_ratio``.

    ``schedule``: ``"cosine"`` (one decay over the stage), ``"restarts"`` (cosine decay restarting
    every ``restart_epochs``, as ``CosineAnnealingWarmRestarts`` with ``T_mult=1``) or
    ``"constant"``; ``warmup_epochs`` may be fractional; the schedule advances once per optimiser
    step.
    ``grad_clip``: max gradient norm (0 disables). ``accumulate``: micro-batches per optimiser
    step (the effective batch is ``batch_size * accumulate * world_size``). With a Cox loss each
    micro-batch is its own risk set: accumulation sums gradients of per-micro-batch partial
    likelihoods, it does not enlarge the risk sets (use a bigger batch or more GPUs for that).

    Example:
        >>> OptimConfig(lr="1e-3", schedule="restarts").lr     # YAML reads 1e-3 (no dot) as a string
        0.001
        >>> OptimConfig(schedule="linear")
        Traceback (most recent call last):
        ...
        lungcore.train.config.ConfigError: optim.schedule must be 'cosine', 'restarts' or 'constant', got 'linear'
    """

    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    accumulate: int = 1
    schedule: str = "cosine"
    restart_epochs: float = 10.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ConfigError("optim.optimizer", f"must be 'adamw', 'adam' or 'sgd', got {self.optimizer!r}")
        self.lr = _number("optim.lr", self.lr, "> 0")
        self.weight_decay = _number("optim.weight_decay", self.weight_decay, ">= 0")
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError("optim.betas", f"must be 2 numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(_number("optim.betas", b, "in [0, 1)") for b in self.betas)
        self.momentum = _number("optim.momentum", self.momentum, "in [0, 1)")
        self.warmup_epochs = _number("optim.warmup_epochs", self.warmup_epochs, ">= 0")
        self.min_lr_ratio = _number("optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        self.grad_clip = _number("optim.grad_clip", self.grad_clip, ">= 0")
        self.accumulate = _integer("optim.accumulate", self.accumulate, 1)
        if self.schedule not in ("cosine", "restarts", "constant"):
            raise ConfigError("optim.schedule", f"must be 'cosine', 'restarts' or 'constant', got {self.schedule!r}")
        self.restart_epochs = _number("optim.restart_epochs", self.restart_epochs, "> 0")


@dataclass
class DataConfig:
    """Cohort, splits, preprocessing and loading.

    ``split``: fractions (train, val, test) by patient, stratified on the event/label
    (``lungcore.data.split_by_patient``); ``preprocess``: fields of
    ``lungcore.data.PreprocessSettings`` (empty = the network's default); ``cache_dir``:
    where preprocessed crops are cached (default ``<out>/cache``); ``augment``: train-time
    augmentation (``lungcore.data.Augmentation`` defaults) on or off; ``verify``: how the cache
    recognises a source image it has seen (``"stat"``: by size and modification time, fast;
    ``"content"``: by hashing every file each time, which also catches a file rewritten with the
    same size and time).

    Example:
        >>> from pathlib import Path
        >>> data = DataConfig(manifest=Path("manifest.csv"), split=[0.8, 0.1, 0.1], batch_size=16)
        >>> data.manifest, data.split, data.batch_size          # a Path is kept as a string, as YAML holds it
        ('manifest.csv', (0.8, 0.1, 0.1), 16)
        >>> DataConfig(split=(0.7, 0.2, 0.2))
        Traceback (most recent call last):
        ...
        lungcore.train.config.ConfigError: data.split must be 3 fractions (train, val, test) summing to 1,
        got (0.7, 0.2, 0.2)
    """

    manifest: str | None = None
    schema: str | None = None
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    batch_size: int = 8
    eval_batch_size: int | None = None
    num_workers: int = 0
    preprocess: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    augment: bool = True
    verify: str = "stat"

    def __post_init__(self) -> None:
        for name in ("manifest", "schema", "cache_dir"):  # a pathlib.Path is welcome; YAML keeps strings
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, os.fspath(value))
        if self.verify not in ("stat", "content"):
            raise ConfigError("data.verify", f"must be 'stat' or 'content', got {self.verify!r}")
        if not isinstance(self.split, (list, tuple)) or len(self.split) != 3:
            raise ConfigError("data.split", f"must be 3 fractions (train, val, test), got {self.split!r}")
        self.split = tuple(_number("data.split", f, ">= 0") for f in self.split)
        if not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ConfigError("data.split", f"must be 3 fractions (train, val, test) summing to 1, got {self.split}")
        self.split_seed = _integer("data.split_seed", self.split_seed, 0)
        self.batch_size = _integer("data.batch_size", self.batch_size, 1)
        if self.eval_batch_size is not None:
            self.eval_batch_size = _integer("data.eval_batch_size", self.eval_batch_size, 1)
        self.num_workers = _integer("data.num_workers", self.num_workers, 0)
        self.augment = _boolean("data.augment", self.augment)
        _check_preprocess(self.preprocess)


def _check_preprocess(preprocess: Any) -> None:
    """``data.preprocess``: a mapping of ``lungcore.data.PreprocessSettings`` fields, each a value
    that class takes; else a ``ValueError`` naming the key (``data.preprocess: unknown keys [...]``)
    or a :class:`ConfigError` naming the field (``data.preprocess.crop must be ...``). Each field is
    checked alone (over the defaults), so a valid value is never refused for another's sake."""
    if not isinstance(preprocess, dict):
        raise ConfigError("data.preprocess", f"must be a mapping of preprocessing settings, got {preprocess!r}")
    if not preprocess:
        return
    from lungcore.data import PreprocessSettings

    names = {f.name for f in dataclasses.fields(PreprocessSettings)}
    unknown = sorted(set(preprocess) - names, key=str)
    if unknown:
        raise ValueError(f"data.preprocess: unknown keys {unknown}; known: {sorted(names)}")
    for name, value in preprocess.items():
        try:
            PreprocessSettings.from_dict({name: value})
        except (TypeError, ValueError) as exc:
            problem = str(exc)
            problem = problem[len(name) + 1:] if problem.startswith(f"{name} ") else f"is invalid ({problem}), got {value!r}"
            raise ConfigError(f"data.preprocess.{name}", problem) from None


def _model_class(model: Any) -> Any:
    """The registered class of ``model``, or None for a name the registry does not know (the run
    names that error itself, before any work)."""
    from lungcore.models.registry import model_class

    try:
        return model_class(model)
    except (TypeError, ValueError):
        return None


@dataclass
class TrainConfig:
    """One training run. ``stage``: which of the model's stages to run (``"all"``: every stage in
    order, e.g. CMML pretrain then finetune); ``epochs`` per stage unless ``stage_epochs`` names
    one (a name that is no stage of ``model`` is a :class:`ConfigError` naming it and the model's
    stages; ``lungcore train --epochs`` / ``fit(epochs=)`` replace both: every stage runs that
    count); ``precision``: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"bf16"`` or ``"fp32"``;
    ``monitor``: the validation metric selecting the best model (``"auto"``: the model's C-index
    mean / ROC AUC, validation loss for pretraining); ``patience``: epochs without improvement
    before stopping a stage early (0: never); ``recipe``: ``"lungcore"`` (the ``optim`` section as
    given) or ``"paper"`` (the optimiser and schedule the model's paper published replace the
    ``optim`` fields they name: CSF-Net's Adam 1e-4, betas (0.9, 0.999), cosine to 0.1x per epoch;
    a model whose paper gives none raises).

    Example:
        >>> cfg = TrainConfig(model="cmml", epochs=5, stage_epochs={"pretrain": 20}, data={"batch_size": 16})
        >>> cfg.epochs_for("pretrain"), cfg.epochs_for("finetune"), cfg.data.batch_size, cfg.optim.lr
        (20, 5, 16, 0.0003)
        >>> TrainConfig.from_dict({"model": "csfnet", "optim": {"learning_rate": 1e-3}})   # a typo is an error
        Traceback (most recent call last):
        ...
        ValueError: optim: unknown keys ['learning_rate']; known: ['accumulate', 'betas', ...]
        >>> TrainConfig(model="csfnet", stage_epochs={"pretrain": 20})       # CMML's stage, not CSF-Net's
        Traceback (most recent call last):
        ...
        lungcore.train.config.ConfigError: stage_epochs.pretrain is not a stage of 'csfnet'; its stages: ['train']
    """

    model: str = "cmml"
    recipe: str = "lungcore"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    stage: str = "all"
    epochs: int = 10
    stage_epochs: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    monitor: str = "auto"
    patience: int = 0
    deterministic: bool = True
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = _build(DataConfig, self.data, "data")
        if isinstance(self.optim, dict):
            self.optim = _build(OptimConfig, self.optim, "optim")
        if self.recipe not in ("lungcore", "paper"):
            raise ConfigError("recipe", f"must be 'lungcore' or 'paper', got {self.recipe!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError("precision", f"must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError("device", f"must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        self.epochs = _integer("epochs", self.epochs, 1)
        if not isinstance(self.stage_epochs, dict):
            raise ConfigError("stage_epochs", f"must be a mapping of stage -> epochs, got {self.stage_epochs!r}")
        self.stage_epochs = {k: _integer(f"stage_epochs.{k}", v, 1) for k, v in self.stage_epochs.items()}
        if not isinstance(self.model_overrides, dict):
            raise ConfigError("model_overrides", f"must be a mapping of {self.model}'s config fields, "
                                                 f"got {self.model_overrides!r}")
        cls = _model_class(self.model) if self.stage_epochs or self.model_overrides else None
        if cls is not None:
            self.check_stage_epochs()
            config_class = getattr(cls, "config_class", None)
            if dataclasses.is_dataclass(config_class):
                names = {f.name for f in dataclasses.fields(config_class)}
                unknown = sorted(set(self.model_overrides) - names, key=str)
                if unknown:
                    raise ValueError(f"model_overrides: unknown keys {unknown}; known: {sorted(names)}")
        self.seed = _integer("seed", self.seed)
        self.deterministic = _boolean("deterministic", self.deterministic)
        self.progress = _boolean("progress", self.progress)
        self.patience = _integer("patience", self.patience, 0)

    def check_stage_epochs(self) -> None:
        """Each ``stage_epochs`` name must be a stage of ``model``, else a :class:`ConfigError` naming
        the entry and the model's stages: a typo (or another model's stage) would silently train the
        default count. Every config is checked so on creation, wherever it comes from (a file, a
        dict, ``fit`` keywords); call it again after changing ``model`` or ``stage_epochs``. A model
        name the registry does not know is not checked here (the run names that error itself).

        Example:
            >>> cfg = TrainConfig(model="cmml", stage_epochs={"pretrain": 20})
            >>> cfg.model = "csfnet"
            >>> cfg.check_stage_epochs()
            Traceback (most recent call last):
            ...
            lungcore.train.config.ConfigError: stage_epochs.pretrain is not a stage of 'csfnet'; its stages: ['train']
        """
        cls = _model_class(self.model) if self.stage_epochs else None
        if cls is None:
            return
        stages = list(cls.stages)
        for name in self.stage_epochs:
            if name not in stages:
                raise ConfigError(f"stage_epochs.{name}", f"is not a stage of {self.model!r}; its stages: {stages}")

    def epochs_for(self, stage: str) -> int:
        """Epochs of ``stage``: its ``stage_epochs`` entry, else ``epochs``."""
        return int(self.stage_epochs.get(stage, self.epochs))

    # -- plain data ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML form (tuples as lists): what ``save_yaml`` writes and a checkpoint stores."""
        def plain(x: Any) -> Any:
            if isinstance(x, tuple):
                return [plain(v) for v in x]
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, list):
                return [plain(v) for v in x]
            return x
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from its dict form (nested ``data`` / ``optim``); unknown keys are errors."""
        return _build(cls, d, "config")

    @classmethod
    def from_yaml(cls, path: str | Path, **fields: Any) -> TrainConfig:
        """A config from a YAML file; every error names the file (and the field). ``fields``
        (top-level fields, ``model="csfnet"``) replace the file's before it is checked, as
        ``lungcore train``'s flags beat the file: the file's ``stage_epochs`` and ``model_overrides``
        are then checked against the network that runs."""
        data = usage.read_mapping(path, "config file", fmt="yaml", of=" of TrainConfig fields", empty_ok=True)
        data = {**data, **fields}
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config file {path}: {exc}") from None

    def save_yaml(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as YAML to ``path``; returns it."""
        import yaml

        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    return cls(**d)
