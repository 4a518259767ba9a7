"""Checks a training run makes before its first step, so that it fails early or not at all.

:func:`read_every_image` reads every image the run will use (or finds all of its crops in the
cache) with the reader and the checks of ``lungcore validate --images full``: a bad image is a
:class:`~lungcore.data.ManifestError` naming its manifest row and column, raised before anything
is written. :func:`learnability` lists what makes a cohort unable to teach or select a model
(no events, an all-censored or one-class validation split, a single patient).

Example:
    >>> import tempfile
    >>> from lungcore.data import PreprocessSettings, read_manifest, synth_cohort
    >>> m = read_manifest(synth_cohort("survival", tempfile.mkdtemp(), n=3, preset="tiny")["manifest"])
    >>> read_every_image(m, range(len(m)), PreprocessSettings.cmml())   # ManifestError if any is bad
    {'cached': 0, 'read': 3}
"""
from __future__ import annotations

from collections.abc import Sequence
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def read_every_image(manifest: Any, rows: Sequence[int], settings: Any, cache_dir: str | Path | None = None, *,
                     verify: str = "stat", progress: bool = False, fill: bool = False,
                     workers: int = 1) -> dict[str, int]:
    """Read (or find in the cache) every image of ``manifest`` rows ``rows``.

    Returns ``{"cached": images whose crops were all cached, "read": images read}``; raises
    :class:`lungcore.data.ManifestError` listing every unreadable image (row, column, value),
    or a centre that lies outside its image, exactly as ``lungcore validate --images full``.

    ``fill=False`` writes nothing. ``fill=True`` (with a ``cache_dir``; what ``train`` does) crops
    every image into the cache in the same pass, with ``lungcore preprocess``'s pool of ``workers``
    processes and this process's shard of a ``torchrun`` job: each CT is read once, for its check
    and its crops. Crops of good images are kept when another image fails (valid, atomic cache
    entries), except that a cache folder this call created is removed again (with the folders
    created for it): a run that fails its checks leaves nothing behind.
    """
    from tqdm import tqdm

    from lungcore.data.manifest import ManifestError
    from lungcore.data.preprocess import Preprocessor

    jobs = _image_jobs(manifest, rows)
    if fill and cache_dir is not None:
        return _fill_every_image(manifest, rows, jobs, settings, Path(cache_dir), verify, progress, workers)
    pre = Preprocessor(settings, cache_dir=cache_dir, verify=verify)
    frame = manifest.schema.centre_frame
    problems: list[Any] = []
    counts = {"cached": 0, "read": 0}
    for path in tqdm(sorted(jobs, key=str), desc="check images", unit="CT", disable=not progress):
        try:
            if pre.cached(path, [manifest.centres[i, t] for i, t in jobs[path]], frame):
                counts["cached"] += 1
                continue
        except OSError:
            pass  # unreadable for hashing: the read below names the problem
        counts["read"] += 1
        problems += _image_problems(manifest, path, jobs[path])
    if problems:
        raise ManifestError(manifest.path, sorted(problems, key=lambda p: p.row))
    return counts


def _image_jobs(manifest: Any, rows: Sequence[int]) -> dict[Path, list[tuple[int, int]]]:
    """(row index, image column index) of every image cell of ``rows``, by image."""
    jobs: dict[Path, list[tuple[int, int]]] = {}
    for i in sorted(set(int(r) for r in rows)):
        for t, p in enumerate(manifest.images[i]):
            if p is not None:
                jobs.setdefault(Path(p), []).append((i, t))
    return jobs


def _image_problems(manifest: Any, path: Path, boxes: list[tuple[int, int]]) -> list[Any]:
    """The problems of one image (read in full) at its cells ``boxes``, as ``validate --images full`` words them."""
    from lungcore.data.image_checks import centre_outside, check_image
    from lungcore.data.manifest import ManifestProblem

    columns = manifest.schema.image_columns
    frame = manifest.schema.centre_frame
    bad, geometry = check_image(path, "full")
    if bad:
        text = _cell_text(manifest, path)
        return [ManifestProblem(manifest.rows[i], columns[t], text, *bad) for i, t in boxes]
    problems = []
    for i, t in boxes:
        centre = manifest.centres[i, t]
        if geometry is not None and np.all(np.isfinite(centre)):
            outside = centre_outside(centre, frame, geometry)
            if outside:
                cols = manifest.schema.centre_columns.get(columns[t], [columns[t]])
                problems.append(ManifestProblem(manifest.rows[i], cols[0], f"{centre[0]:g}", outside))
    return problems


def _fill_every_image(manifest: Any, rows: Sequence[int], jobs: dict[Path, list[tuple[int, int]]], settings: Any,
                      cache: Path, verify: str, progress: bool, workers: int) -> dict[str, int]:
    """``read_every_image(fill=True)``: one pass that checks and crops (see there)."""
    from lungcore.data.manifest import ManifestError, ManifestProblem
    from lungcore.data.preprocess import Preprocessor, preprocess_manifest
    from lungcore.train import distributed as dist_utils

    rank, world = dist_utils.world()
    created = _first_missing(cache)
    pre = Preprocessor(settings, cache_dir=cache, verify=verify)
    report = preprocess_manifest(manifest.subset(sorted(set(int(r) for r in rows))), pre, shard=(rank, world),
                                 workers=workers, keep_going=True, progress=progress)
    failed = [f for part in dist_utils.gather(report["failed"]) for f in part]
    dist_utils.barrier()
    if failed:
        problems = []
        for f in sorted(failed, key=lambda f: f["path"]):
            path = Path(f["path"])
            found = _image_problems(manifest, path, jobs[path])
            if not found:  # the image reads and its centres lie inside: the crop or its write failed
                i, t = jobs[path][0]
                found = [ManifestProblem(manifest.rows[i], manifest.schema.image_columns[t],
                                         _cell_text(manifest, path), "cannot be preprocessed", f["error"])]
            problems += found
        if created is not None and rank == 0:
            shutil.rmtree(created, ignore_errors=True)
        raise ManifestError(manifest.path, sorted(problems, key=lambda p: p.row))
    read = sum(dist_utils.gather(int(report["images_read"])))
    return {"cached": len(jobs) - read, "read": read}


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _cell_text(manifest: Any, path: Path) -> str:
    """The manifest cell as written (relative to the manifest's folder when it is inside it)."""
    try:
        return str(path.relative_to(manifest.path.parent))
    except ValueError:
        return str(path)


def learnability(task: str, manifest: Any, splits: dict[str, list[int]]) -> list[str]:
    """Warnings about a cohort a model cannot learn from or be selected on (empty: none).

    Survival: an endpoint with no event in the training split; a validation split where no
    endpoint has a comparable pair (C-index undefined). Classification: one class only in the
    training or validation split. Both: a single patient; an empty validation split.
    """
    warnings: list[str] = []
    if len(set(manifest.patient_ids)) < 2:
        warnings.append("the cohort has a single patient: nothing to learn or to validate on")
    if not splits.get("val"):
        warnings.append("the validation split is empty: no model selection, the last epoch is kept")
    if task == "survival":
        for e in ("pfs", "os"):
            mask = manifest.endpoints.get(f"{e}_mask")
            if mask is None:
                continue
            train = [i for i in splits["train"] if mask[i]]
            if train and not any(manifest.endpoints[f"{e}_event"][i] == 1 for i in train):
                warnings.append(f"no {e} events in the training split ({len(train)} rows, all censored): "
                                f"the {e} risk cannot be learnt")
        if splits.get("val") and not metric_defined(task, manifest, splits["val"]):
            warnings.append("the validation C-index is undefined (no event with a later time to compare in any "
                            "endpoint): models are selected on the validation loss instead")
    else:
        for split in ("train", "val"):
            rows = [i for i in splits.get(split, []) if manifest.label_mask[i]]
            classes = sorted({int(manifest.label[i]) for i in rows})
            if rows and len(classes) < 2:
                what = "the validation ROC AUC is undefined: models are selected on the validation loss instead" \
                    if split == "val" else "the classifier cannot learn to separate the classes"
                warnings.append(f"the {split} split holds one class only (label {classes[0]}): {what}")
    return warnings


def metric_defined(task: str, manifest: Any, rows: Sequence[int]) -> bool:
    """Whether the validation metric (C-index / ROC AUC) can be computed on ``rows`` at all."""
    if task == "survival":
        for e in ("pfs", "os"):
            mask = manifest.endpoints.get(f"{e}_mask")
            if mask is None:
                continue
            t = np.asarray([manifest.endpoints[f"{e}_time"][i] for i in rows if mask[i]])
            ev = np.asarray([manifest.endpoints[f"{e}_event"][i] for i in rows if mask[i]])
            if ev.size and any((t > t_i).any() for t_i in t[ev == 1]):
                return True
        return False
    labels = {int(manifest.label[i]) for i in rows if manifest.label_mask[i]}
    return len(labels) == 2
