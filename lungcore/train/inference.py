"""Inference with a trained model: per-sample predictions over a loader, the per-epoch validation
metrics, the test split's report at the end of :func:`lungcore.train.fit`, and :func:`evaluate` /
:func:`predict` of a checkpoint on a new manifest (coded with the checkpoint's schema).

Example (runs as a doctest in :mod:`lungcore.train.loop`)::

    frame = predict("runs/cmml/best.pt", "new_cohort/manifest.csv", "risks.csv")
    metrics = evaluate("runs/csf/best.pt", "external/manifest.csv", "runs/csf/external")
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungcore.data.outliers import sd_text
from lungcore.train import distributed as dist_utils
from lungcore.train.cohort import CohortData, dataset, load_manifest, loader, require_targets

TARGET_KEYS = ("pfs_time", "pfs_event", "pfs_mask", "os_time", "os_event", "os_mask", "label", "label_mask")


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision`` "bf16" (or "auto" on CUDA), else a disabled autocast."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (ids and other lists as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def quiet_readers() -> None:
    """MONAI's DICOM reader warns once per series that nvImageCodec is absent: noise, not news."""
    import logging

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


@torch.no_grad()
def run_predictions(model: nn.Module, batches, device: torch.device, precision: str = "auto",
                    stage: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Per-sample outputs of ``model.predict`` over a loader (+ the mean of ``model.loss`` if ``stage``)."""
    from tqdm import tqdm

    model.eval()
    outputs: dict[str, list[np.ndarray]] = {}
    ids: list[str] = []
    targets: dict[str, list[np.ndarray]] = {}
    losses = []
    with dist_utils.cross_rank_cox(model, False):
        for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress, leave=False):
            batch = to_device(batch, device)
            with autocast(device, precision):
                pred = model.predict(batch)
                if stage is not None:
                    loss, _ = model.loss(batch, stage)
                    losses.append(float(loss.float()))
            for k, v in pred.items():
                outputs.setdefault(k, []).append(v.detach().float().cpu().numpy())
            for k in TARGET_KEYS:
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


def report_test_split(model, task, data: CohortData, datasets, cfg, device, out: Path, history,
                    warnings: list[str] = ()) -> dict[str, float]:
    """The end of a run: predictions on the test split (``predictions_test.csv``), the Breslow
    baseline of the training split saved in ``best.pt`` (survival), and ``report/``."""
    from lungcore.models.registry import read_checkpoint, save_model
    from lungcore.train.report import write_predictions, write_report

    bs = cfg.data.eval_batch_size or cfg.data.batch_size
    test = run_predictions(model, loader(datasets["test"], bs, num_workers=cfg.data.num_workers), device,
                           cfg.precision)
    reference = None
    if task == "survival":
        train_eval = dataset(data, data.splits["train"], False)
        reference = run_predictions(model, loader(train_eval, bs, num_workers=cfg.data.num_workers), device,
                                    cfg.precision)
        if hasattr(model, "fit_baseline"):  # Breslow baseline of the training split, saved in best.pt
            keys = [k for k in reference if k[:3] in ("pfs", "os_") or k in ("pfs", "os")]
            model.fit_baseline({e: torch.as_tensor(reference[e]) for e in ("pfs", "os") if e in reference},
                               {k: torch.as_tensor(reference[k]) for k in keys})
            payload = read_checkpoint(out / "best.pt")
            save_model(model, out / "best.pt", {**payload["extra"], "baseline": "breslow (training split)"})
    patients = {i: p for i, p in zip(data.manifest.ids, data.manifest.patient_ids)}
    test["patient_id"] = [patients[i] for i in test["id"]]
    write_predictions(test, task, out / "predictions_test.csv")
    notes: list[str] = []
    flat = write_report(out / "report", task, test, reference=reference, history=history,
                        title=f"{cfg.model} — test split ({len(test['id'])} samples)", warnings=warnings,
                        reference_name="the training split", notes=notes)
    if notes and dist_utils.is_main():  # why a test metric is null: stderr and train.log
        from lungcore.train.runlog import log

        for line in notes:
            log(out, f"test split: {line}", echo=False)
            _say("train", f"test split: {line}")
    return flat


def _checkpoint_settings(checkpoint: str | os.PathLike) -> tuple[dict[str, Any], Any, Any, Any]:
    """``(payload, schema, preprocessing settings, model)`` of a checkpoint written by lungcore train."""
    from lungcore.data import CohortSchema, PreprocessSettings
    from lungcore.models.registry import load_model, read_checkpoint
    from lungcore.usage import UsageError

    payload = read_checkpoint(checkpoint)
    extra = payload.get("extra", {})
    if "schema" not in extra or "preprocess" not in extra:
        lacking = " and ".join(f"extra[{k!r}]" for k in ("schema", "preprocess") if k not in extra)
        raise ValueError(f"checkpoint {checkpoint} lacks the cohort schema / preprocessing settings ({lacking}; "
                         "lungcore train writes both; a checkpoint of your own: save_model(model, path, "
                         "extra={'schema': schema.to_dict(), 'preprocess': settings.to_dict()}))")
    try:
        schema = CohortSchema.from_dict(extra["schema"])
        settings = PreprocessSettings.from_dict(extra["preprocess"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {checkpoint}: its schema / preprocessing settings are invalid ({exc})") from None
    model, _ = load_model(checkpoint)  # a wrong shape / unknown model / unknown field: ValueError naming the file
    return payload, schema, settings, model


def _check_kind(checkpoint: Any, payload: dict[str, Any], schema: Any, manifest: str | os.PathLike,
                flag: str = "--manifest") -> None:
    """A manifest with its own schema file of another cohort kind than the checkpoint's is refused."""
    from lungcore.data import CohortSchema
    from lungcore.data.schema import schema_beside
    from lungcore.usage import UsageError, argument

    own = schema_beside(manifest) if Path(manifest).is_file() else None
    if own is None:
        return
    try:
        kind = CohortSchema.load(own).kind
    except (ValueError, OSError):
        kind = schema.kind
    if kind != schema.kind:
        raise UsageError(f"{argument('--checkpoint')} {checkpoint} is a {payload['model']} model of {schema.kind!r} "
                         f"cohorts but {argument(flag)} {manifest} is a {kind!r} cohort ({own.name})")


def _check_stage(checkpoint: str | os.PathLike, payload: dict[str, Any], model: Any) -> None:
    """A checkpoint of a stage before the model's last (CMML's ``best_pretrain.pt``) is refused,
    pointing at the run's ``best.pt`` when that one is of the last stage."""
    from lungcore.models.registry import read_checkpoint
    from lungcore.train.checkpoints import stage_problem
    from lungcore.usage import UsageError, argument

    problem = stage_problem(payload, model)
    if problem is None:
        return
    last = tuple(model.stages)[-1]
    best = Path(checkpoint).parent / "best.pt"
    way = (f"train the {last!r} stage (lungcore train --stage all, or --resume a run that stopped after "
           f"{payload['extra']['stage']!r})")
    try:
        if best.is_file() and not best.samefile(checkpoint) and \
                stage_problem(read_checkpoint(best), model) is None:
            way = f"use {best} (the run's final model) instead"
    except (ValueError, OSError):
        pass
    raise UsageError(f"{argument('--checkpoint')} {checkpoint}: {problem}, so its risks / probabilities would mean "
                     f"nothing; evaluate and predict need a checkpoint of the {last!r} stage: {way}")


def _load(checkpoint: str | os.PathLike, device: str | None) -> tuple[dict[str, Any], Any, Any, Any]:
    """``(payload, schema, settings, model)`` of ``checkpoint``, ``device`` and the checkpoint's
    stage checked (no image read)."""
    from lungcore.usage import device as check_device

    quiet_readers()
    check_device(device)
    loaded = _checkpoint_settings(checkpoint)
    _check_stage(checkpoint, loaded[0], loaded[3])
    return loaded


def _say(command: str, message: str) -> None:
    """A note on stderr (rows left out, undefined metrics, outputs that are not finite)."""
    print(f"lungcore {command}: {message}", file=sys.stderr, flush=True)


def _left_out(m: Any, model: Any, manifest: str | os.PathLike) -> list[str]:
    """What ``evaluate`` does not score: the rows of ``m`` without a label (nodules) or, per endpoint
    of the model, without that endpoint (survival), worded as ``lungcore cindex`` says it."""
    n = len(m)
    if m.schema.kind == "nodules":
        missing = n if m.label_mask is None else int((~m.label_mask.astype(bool)).sum())
        if not missing:
            return []
        return [f"left out {missing} of {n} rows of {manifest} without a label (an empty "
                f"{m.schema.label_column!r} cell); predict gives their probabilities"]
    lines = []
    for e in getattr(model, "endpoints", None) or m.schema.endpoints:
        mask = m.endpoints.get(f"{e}_mask")
        missing = n if mask is None else int((~mask.astype(bool)).sum())
        if missing == n:
            lines.append(f"no row of {manifest} has the {e} endpoint (a {e}_time and a {e}_event): its metrics "
                         "are null")
        elif missing:
            lines.append(f"left out {missing} of {n} rows of {manifest} without the {e} endpoint (an empty "
                         f"{e}_time or {e}_event cell) from the {e} metrics")
    return lines


def _output_columns(pred: dict[str, Any], task: str) -> list[str]:
    """The model outputs that ``predict`` writes: the risk per endpoint, or the probability."""
    return [e for e in ("pfs", "os") if e in pred] if task == "survival" else \
        [k for k in ("probability",) if k in pred]


def not_finite_rows(pred: dict[str, Any], task: str, m: Any, schema: Any = None) -> list[dict[str, Any]]:
    """The rows of ``m`` whose output is not finite: ``row`` (as a spreadsheet numbers it), ``id``,
    ``outputs`` (the CSV columns) and, when one is far out, the numeric clinical ``column`` / ``value``
    farthest from the training mean in ``sd`` standard deviations (e.g. an age of 1e25 makes
    CMML's risk NaN). ``schema``: the fitted schema whose means and SDs measure "far" (default: ``m``'s)."""
    schema = schema if schema is not None else m.schema
    columns = _output_columns(pred, task)
    bad = np.zeros(len(pred["id"]), bool)
    for k in columns:
        bad |= ~np.isfinite(np.asarray(pred[k], dtype=np.float64))
    index = {i: j for j, i in enumerate(m.ids)}
    names = {"pfs": "pfs_risk", "os": "os_risk"}
    found = []
    for k in np.flatnonzero(bad):
        rid = pred["id"][k]
        j = index.get(rid)
        item: dict[str, Any] = {"row": None if j is None else m.rows[j], "id": rid,
                                "outputs": [names.get(c, c) for c in columns if not np.isfinite(float(pred[c][k]))]}
        worst, far = None, 0.0
        for v in schema.clinical if j is not None else ():
            if v.kind != "numeric" or not v.std:
                continue
            try:
                z = abs((float(m.clinical_raw[v.name][j]) - (v.mean or 0.0)) / v.std)
            except (ValueError, KeyError, IndexError):
                continue
            if z > far or not math.isfinite(z):
                worst, far = v.name, z
                if not math.isfinite(z):
                    break
        if worst is not None and far > 20:
            item.update(column=worst, value=m.clinical_raw[worst][j], sd=far)
        found.append(item)
    return found


def not_finite_line(item: dict[str, Any]) -> str:
    """``row R (id I): pfs_risk is not finite (its 'age' value ... standard deviations ...)``."""
    outputs = item["outputs"]
    line = (f"row {item['row']} (id {item['id']})" if item["row"] is not None else f"id {item['id']}") + \
        f": {', '.join(outputs)} {'is' if len(outputs) == 1 else 'are'} not finite"
    if "column" in item:
        line += f" ({_far(item)})"
    return line


def _far(item: dict[str, Any]) -> str:
    return (f"its {item['column']!r} value {item['value']} is {sd_text(item['sd'])} standard deviations from the "
            "training cohort's mean")


def _refuse_not_finite(pred: dict[str, Any], task: str, m: Any, manifest: str | os.PathLike) -> None:
    """evaluate: a scored row (one with a label / an endpoint) whose output is not finite makes the
    metrics undefined: a :class:`ManifestError` naming each such row, its id and (when one is far
    out) the clinical value behind it (exit 1)."""
    from lungcore.data import ManifestError
    from lungcore.data.manifest import ManifestProblem

    masks = [pred[k] for k in pred if k == "label_mask" or (k.endswith("_mask") and k[:-5] in ("pfs", "os")
                                                            and k[:-5] in pred)]
    scored = {i for j, i in enumerate(pred["id"]) if not masks or any(bool(mk[j]) for mk in masks)}
    found = [item for item in not_finite_rows(pred, task, m) if item["id"] in scored]
    if not found:
        return
    problems = []
    for item in found:
        message = (f"the model's {' and '.join(item['outputs'])} for {item['id']} "
                   f"{'is' if len(item['outputs']) == 1 else 'are'} not finite, so no metric can be computed")
        if "column" in item:
            problems.append(ManifestProblem(item["row"], item["column"], item["value"],
                                            f"{message}: this value is {sd_text(item['sd'])} standard deviations "
                                            "from the training cohort's mean"))
        else:
            problems.append(ManifestProblem(item["row"] or 0, m.schema.id_column, str(item["id"]),
                                            f"{message} (predict writes the other rows)"))
    raise ManifestError(manifest, problems)


def _coded_manifest(checkpoint: Any, loaded: tuple, manifest: str | os.PathLike, targets: bool = False,
                    flag: str = "--manifest") -> Any:
    """``manifest`` read and coded with the checkpoint's schema (no image read); ``targets``: it must
    hold the labels / an endpoint of the model (evaluate), else an error naming the missing columns."""
    payload, schema, _, model = loaded
    _check_kind(checkpoint, payload, schema, manifest, flag)
    m = load_manifest(manifest, schema)
    if targets:
        require_targets(m, manifest, getattr(model, "endpoints", None))
    return m


@contextlib.contextmanager
def _batches(loaded: tuple, m: Any, batch_size: int, device: str | None, cache_dir: str | os.PathLike | None = None,
             workers: int = 1, progress: bool = False) -> Iterator[tuple[Any, torch.device]]:
    """``(batches, device)`` of the coded manifest ``m``: every CT is read once, checked (a bad one
    named by its row before any prediction) and cropped into ``cache_dir`` by ``workers``
    processes, or into a temporary folder (deleted on exit) when ``cache_dir`` is None; the batches
    then read crops only. The model of ``loaded`` is moved to the device."""
    from lungcore.data import CohortDataset
    from lungcore.train.preflight import read_every_image

    _, schema, settings, model = loaded
    with contextlib.ExitStack() as stack:
        cache = cache_dir if cache_dir is not None else \
            stack.enter_context(tempfile.TemporaryDirectory(prefix="lungcore-crops-"))
        read_every_image(m, range(len(m)), settings, cache, fill=True, workers=workers, progress=progress)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(dev)
        ds = CohortDataset(m, schema, settings, cache_dir=cache)
        yield torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False), dev


def _task(loaded: tuple) -> str:
    payload, _, _, model = loaded
    return payload.get("extra", {}).get("task") or type(model).task


def predict(checkpoint: str | os.PathLike, manifest: str | os.PathLike, out: str | os.PathLike | None = None, *,
            batch_size: int = 8, device: str | None = None, cache_dir: str | os.PathLike | None = None,
            workers: int = 1, overwrite: bool = False, progress: bool = False) -> Any:
    """Per-row predictions (risks per endpoint, or malignancy probability) as a pandas DataFrame
    (also written to ``out`` as CSV when given: an existing file only with ``overwrite``; checked
    before any work). The manifest is coded with the checkpoint's schema. Each CT is read once,
    by ``workers`` processes, into ``cache_dir`` (crops kept for the next call) or a temporary folder.
    A row whose output is not finite (a clinical value far outside the training cohort's range can
    make it NaN) gets empty cells, and stderr names it by row and id; the other rows are written.
    A checkpoint of a stage before the model's last (CMML's ``best_pretrain.pt``: its risk heads
    were never trained) is refused before any work.

    The whole path (``fit`` on a tiny synthetic cohort, then ``predict`` and ``evaluate`` on it) is
    the example of :mod:`lungcore.train.loop`: ``predict("runs/cmml/best.pt", "new/manifest.csv",
    "risks.csv")``. A checkpoint needs the cohort schema and preprocessing settings that
    ``lungcore train`` stores in it; weights alone are refused before any image is read.

    Example:
        >>> import os, tempfile
        >>> from lungcore.models import create, save_model
        >>> from lungcore.models.csfnet import CSFNetConfig
        >>> net = create("csfnet", **CSFNetConfig.tiny_overrides())
        >>> bare = save_model(net, os.path.join(tempfile.mkdtemp(), "net.pt"))        # weights + config only
        >>> predict(bare, "new_cohort/manifest.csv")
        Traceback (most recent call last):
        ...
        ValueError: checkpoint .../net.pt lacks the cohort schema / preprocessing settings (extra['schema'] and
        extra['preprocess']; lungcore train writes both; ...)
    """
    from lungcore.train.report import predictions_frame
    from lungcore.usage import integer, out_file, out_folder

    batch_size = integer(batch_size, "--batch-size", 1)
    if out is not None:
        out_file(out, "--out", overwrite=overwrite)
    if cache_dir is not None:  # a shared cache: only that it is a folder it can write to matters
        out_folder(cache_dir, "--cache", overwrite=True)
    loaded = _load(checkpoint, device)
    m = _coded_manifest(checkpoint, loaded, manifest)
    with _batches(loaded, m, batch_size, device, cache_dir, workers, progress) as (batches, dev):
        pred = run_predictions(loaded[3], batches, dev, progress=progress)
    patients = dict(zip(m.ids, m.patient_ids))
    pred["patient_id"] = [patients[i] for i in pred["id"]]
    found = not_finite_rows(pred, _task(loaded), m)
    if found:  # written as empty cells; the other rows are fine
        shown = [not_finite_line(item) for item in found[:10]]
        shown += [f"... and {len(found) - 10} more"] if len(found) > 10 else []
        _say("predict", f"WARNING: the output of {len(found)} of {len(pred['id'])} rows of {manifest} is not finite "
                        "(left as empty cells; the other rows are written):\n  " + "\n  ".join(shown))
    frame = predictions_frame(pred, _task(loaded))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(out)
    return frame


def evaluate(checkpoint: str | os.PathLike, manifest: str | os.PathLike, out: str | os.PathLike | None = None, *,
             batch_size: int = 8, device: str | None = None, reference_manifest: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None, workers: int = 1, overwrite: bool = False,
             progress: bool = False) -> dict[str, float]:
    """Metrics of a checkpoint on every row of a labelled manifest (+ a report folder at ``out``).
    Each CT is read once, as :func:`predict` reads it (``cache_dir``, ``workers``).

    For survival models the Breslow baseline and the censoring distribution come from
    ``reference_manifest`` (the training cohort) when given, else from the evaluated cohort.

    Rows without a label (nodules) or without an endpoint (per survival endpoint) are left out of
    the metrics and stderr says how many. Every metric is returned: one undefined on these rows
    is NaN (``null`` in JSON and ``metrics.json``) and stderr says why (e.g. a C-index needs one
    comparable pair). A scored row whose output is not finite is a
    :class:`~lungcore.data.ManifestError` naming its row and id.

    The whole path (``fit`` on a tiny synthetic cohort, then ``predict`` and ``evaluate`` on it) is
    the example of :mod:`lungcore.train.loop`: ``evaluate("runs/csf/best.pt", "external/manifest.csv",
    "runs/csf/external")``. An ``out`` folder that already holds files is refused before any work
    (``overwrite=True`` replaces the report files).

    Example:
        >>> import os, tempfile
        >>> out = tempfile.mkdtemp()
        >>> _ = open(os.path.join(out, "summary.md"), "w").write("an earlier report")
        >>> evaluate("runs/csf/best.pt", "external/manifest.csv", out)
        Traceback (most recent call last):
        ...
        lungcore.usage.UsageError: out ... is not empty (summary.md); pass overwrite=True to replace it,
        or choose another folder
    """
    from lungcore.train.report import summary_metrics, write_report
    from lungcore.usage import integer, out_folder

    batch_size = integer(batch_size, "--batch-size", 1)
    if out is not None:  # checked before any work: an existing report is replaced only with overwrite
        out_folder(out, "--out", overwrite=overwrite)
    if cache_dir is not None:
        out_folder(cache_dir, "--cache", overwrite=True)
    loaded = _load(checkpoint, device)
    task, model = _task(loaded), loaded[3]
    # both manifests are read and checked (labels / endpoints present) before any image is
    m = _coded_manifest(checkpoint, loaded, manifest, targets=True)
    ref = None
    if task == "survival" and reference_manifest is not None:
        ref = _coded_manifest(checkpoint, loaded, reference_manifest, targets=True, flag="--reference-manifest")
    for line in _left_out(m, model, manifest):  # scored: the rows with a label / the endpoint
        _say("evaluate", line)
    with _batches(loaded, m, batch_size, device, cache_dir, workers, progress) as (batches, dev):
        pred = run_predictions(model, batches, dev, progress=progress)
    _refuse_not_finite(pred, task, m, manifest)
    pred["patient_id"] = list(m.patient_ids)
    reference = None
    if ref is not None:
        with _batches(loaded, ref, batch_size, device, cache_dir, workers, progress) as (batches, dev):
            reference = run_predictions(model, batches, dev)
        _refuse_not_finite(reference, task, ref, reference_manifest)
    source = None if ref is None else f"the reference cohort ({reference_manifest})"
    notes: list[str] = []
    if out is not None:  # replaces the report files an earlier report left there (report.REPORT_FILES)
        flat = write_report(Path(out), task, pred, reference=reference, history=None, reference_name=source,
                            title=f"{Path(checkpoint).name} on {Path(manifest).name}", notes=notes)
    else:
        flat = summary_metrics(task, pred, reference, notes=notes,
                               reference_name=source or "the reference cohort")
    for line in notes:
        _say("evaluate", line)
    return flat
