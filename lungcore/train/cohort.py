"""Cohort preparation for a training run: the manifest read and checked, split by patient, the
schema fitted on the training split, and the datasets and loaders (the crop cache is filled by
:func:`lungcore.train.preflight.read_every_image` in the pass that checks every image).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from lungcore.data import synth_cohort
    >>> from lungcore.train.config import TrainConfig
    >>> d = Path(tempfile.mkdtemp())
    >>> manifest = synth_cohort("nodules", d / "cohort", n=12, preset="tiny")["manifest"]
    >>> data = prepare_data(TrainConfig(model="csfnet", data={"manifest": str(manifest)}), d / "run")
    >>> sorted(data.splits), sum(len(rows) for rows in data.splits.values())
    (['test', 'train', 'val'], 12)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lungcore.train.config import TrainConfig


@dataclass
class CohortData:
    manifest: Any
    schema: Any          # fitted CohortSchema
    settings: Any        # PreprocessSettings
    splits: dict[str, list[int]]
    cache_dir: Path | None
    verify: str = "stat"  # how the cache recognises a source image (DataConfig.verify)


def load_manifest(path: str | Path, schema: Any = None):
    """:func:`lungcore.data.read_manifest` of ``path``, its images checked only for existence: the
    commands that load it (train, evaluate, predict) then read every image in full
    (:func:`lungcore.train.preflight.read_every_image`), which names every bad one at once, as
    ``validate --images full`` does (a header check here would stop at the unreadable ones first).
    A missing file, or a folder given for one, is named."""
    from lungcore.data import read_manifest
    from lungcore.data.manifest import manifest_file_problem

    problem = manifest_file_problem(path)
    if problem is not None:
        raise FileNotFoundError(problem)
    return read_manifest(Path(path), schema, images="exists")


def model_task(name: str) -> str:
    """``"survival"`` or ``"classification"``: what the registered model ``name`` learns."""
    from lungcore.models.registry import model_class

    return model_class(name).task


def _model_needs_images(name: str) -> bool:
    from lungcore.models.registry import model_class

    return bool(getattr(model_class(name), "needs_images", True))


def _check_cohort(cfg: TrainConfig, manifest: Any) -> None:
    """The manifest is of the model's kind, has targets and (when the model needs them) images."""
    task_kind = manifest.schema.kind
    needed = {"survival": "survival", "classification": "nodules"}[model_task(cfg.model)]
    if task_kind != needed:
        raise ValueError(f"model {cfg.model!r} trains on {needed!r} cohorts but {cfg.data.manifest} is a "
                         f"{task_kind!r} manifest")
    require_targets(manifest, cfg.data.manifest)
    if _model_needs_images(cfg.model) and all(p is None for row in manifest.images for p in row):
        raise ValueError(f"model {cfg.model!r} needs CT images, but every image cell of {cfg.data.manifest} "
                         f"(columns {', '.join(manifest.schema.image_columns)}) is empty")


def _saved_splits(splits_file: Path, manifest: Any) -> dict[str, list[int]]:
    """The row indices of the ids a resumed run saved (it keeps its splits even if the split code changed)."""
    by_id = json.loads(splits_file.read_text())
    index = {i: k for k, i in enumerate(manifest.ids)}
    missing = [i for ids in by_id.values() for i in ids if i not in index]
    if missing:
        raise ValueError(f"{splits_file} names ids absent from the manifest (e.g. {missing[:3]}); "
                         "use a fresh --out directory for a different cohort")
    return {name: [index[i] for i in ids] for name, ids in by_id.items()}


def prepare_data(cfg: TrainConfig, out: Path, reuse_splits: bool = True) -> CohortData:
    """Read and validate the manifest, split it by patient, fit the schema on the training split.

    ``reuse_splits``: take the splits of ``out/splits.json`` when it exists (a resumed run).
    Writes nothing (the trainer writes ``splits.json`` once every check passed)."""
    from lungcore.data import PreprocessSettings, split_by_patient

    if not cfg.data.manifest:
        raise ValueError("no manifest: pass --manifest (or data.manifest in the config)")
    manifest = load_manifest(cfg.data.manifest, cfg.data.schema)
    _check_cohort(cfg, manifest)
    splits_file = Path(out) / "splits.json"
    if splits_file.is_file() and reuse_splits:
        splits = _saved_splits(splits_file, manifest)
    else:
        splits = split_by_patient(manifest, cfg.data.split, seed=cfg.data.split_seed)
    if not splits["train"]:
        raise ValueError("the training split is empty: the cohort is too small for data.split")
    schema = manifest.subset(splits["train"]).fit_schema()
    defaults = PreprocessSettings.for_kind(manifest.schema.kind).to_dict()
    settings = PreprocessSettings.from_dict({**defaults, **cfg.data.preprocess})
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(out) / "cache"
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


def dataset(data: CohortData, rows: list[int], augment: bool):
    """The :class:`~lungcore.data.CohortDataset` of ``rows``, coded with the fitted schema."""
    from lungcore.data import Augmentation, CohortDataset, Preprocessor

    return CohortDataset(data.manifest.subset(rows), data.schema,
                         preprocessor=Preprocessor(data.settings, cache_dir=data.cache_dir, verify=data.verify),
                         augment=Augmentation() if augment else None)


def split_datasets(data: CohortData, augment: bool) -> dict[str, Any]:
    """``{"train", "val", "test"}`` datasets; only the training one augments."""
    return {name: dataset(data, data.splits[name], augment and name == "train") for name in ("train", "val", "test")}


def loader(ds, batch_size: int, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
           drop_last: bool = False, distributed: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``ds`` (a DistributedSampler's shard when ``distributed``); the defaults
    are an evaluation pass: in order, every sample."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       num_workers=num_workers, drop_last=drop_last, generator=generator,
                                       persistent_workers=False)
