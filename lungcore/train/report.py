"""Evaluation reports: metric tables with bootstrap CIs, plots (PNG) and a Markdown summary.

Survival (CMML), per endpoint (PFS, OS): Harrell's and Uno's C-index, time-dependent AUC at the
quartiles of the event times, the integrated Brier score of Breslow survival curves (baseline
hazard fitted on the training split's risks), and Kaplan-Meier curves of the high / low risk
groups (split at the training median risk) with the log-rank p-value (lifelines).
Classification (CSF-Net): accuracy, precision, recall, specificity, F1, ROC AUC, ROC curve and
confusion matrix. Bootstrap intervals resample patients (several nodules of one patient move
together).

Example:
    >>> import numpy as np
    >>> from lungcore.train.report import breslow_survival
    >>> s = breslow_survival(np.zeros(4), np.array([1., 2, 3, 4]), np.array([1, 1, 0, 1]), np.zeros(1), [2.5])
    >>> s.shape
    (1, 1)
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

N_BOOT = 300
# every file write_report may write: a new report removes those an earlier one left (other files stay)
REPORT_FILES = ("summary.md", "metrics.json", "training_curves.png", "km_pfs.png", "km_os.png", "roc.png",
                "confusion_matrix.png")


def breslow_survival(train_risk: np.ndarray, train_time: np.ndarray, train_event: np.ndarray, risk: np.ndarray,
                     times) -> np.ndarray:
    """S(t | x) = exp(-H0(t) exp(risk)) with Breslow's H0 from the training risks; (n, len(times)), float64.

    The estimator is the models' own (``lungcore.models.survival``), evaluated in float64.
    """
    from lungcore.models.survival import breslow_baseline, survival_at

    event_times, cumulative = breslow_baseline(torch.as_tensor(np.asarray(train_risk, dtype=np.float64)),
                                               torch.as_tensor(np.asarray(train_time, dtype=np.float64)),
                                               torch.as_tensor(np.asarray(train_event).astype(np.int64)))
    return survival_at(torch.as_tensor(np.asarray(risk, dtype=np.float64)), event_times, cumulative,
                       np.asarray(times, dtype=np.float64), dtype=torch.float64).numpy()


def _shortest(values: Any) -> np.ndarray:
    """float32 values as float64 holding their shortest decimal (a time of 2.6291 read into float32
    is written 2.6291, not 2.6291000843048096); other dtypes as float64."""
    a = np.asarray(values)
    if a.dtype == np.float32:
        return np.array([float(str(x)) for x in a], dtype=np.float64)  # str(float32): shortest round trip
    return a.astype(np.float64)


def predictions_frame(pred: dict[str, Any], task: str):
    """One row per manifest row: id, patient_id, outputs (risks or probability), targets if known.

    Times and outputs hold the shortest decimal of their float32 value (a manifest's 2.6291 stays
    2.6291), events are integers; a row without the endpoint has empty time and event cells."""
    import pandas as pd

    cols: dict[str, Any] = {"id": pred["id"]}
    if "patient_id" in pred:
        cols["patient_id"] = pred["patient_id"]
    if task == "survival":
        endpoints = [e for e in ("pfs", "os") if e in pred]  # the model's endpoints
        for e in endpoints:
            cols[f"{e}_risk"] = _shortest(pred[e])
        for e in endpoints:
            if f"{e}_time" not in pred:
                continue
            mask = pred.get(f"{e}_mask")
            mask = np.ones(len(pred["id"]), bool) if mask is None else np.asarray(mask).astype(bool)
            cols[f"{e}_time"] = np.where(mask, _shortest(pred[f"{e}_time"]), np.nan)
            if f"{e}_event" in pred:
                events = np.asarray(pred[f"{e}_event"], dtype=np.float64).round().astype(np.int64)
                cols[f"{e}_event"] = pd.array([int(v) if m else pd.NA for v, m in zip(events, mask)], dtype="Int64")
    else:
        if "probability" in pred:
            cols["probability"] = _shortest(pred["probability"])
            cols["prediction"] = (np.asarray(pred["probability"]) >= 0.5).astype(int)
        if "label" in pred:
            cols["label"] = np.where(pred["label_mask"], pred["label"], -1)
    return pd.DataFrame(cols)


def write_predictions(pred: dict[str, Any], task: str, path: Path) -> Path:
    predictions_frame(pred, task).to_csv(path, index=False)
    return path


def _safe(fn, *args, **kw) -> float:
    try:
        v = float(fn(*args, **kw))
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return math.nan
    return v


def _ci(metric, *arrays, groups=None) -> tuple[float, float, float]:
    from lungcore.metrics import bootstrap_ci

    try:
        return bootstrap_ci(metric, *arrays, n_boot=N_BOOT, groups=groups)
    except ValueError:
        return _safe(metric, *arrays), math.nan, math.nan


def _survival_endpoint(e: str, pred: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    from lungcore import metrics

    m = pred[f"{e}_mask"].astype(bool)
    risk, t, ev = pred[e][m].astype(np.float64), pred[f"{e}_time"][m].astype(np.float64), pred[f"{e}_event"][m] > 0.5
    groups = np.asarray(pred["patient_id"])[m] if "patient_id" in pred else None
    out: dict[str, Any] = {"n": int(m.sum()), "events": int(ev.sum())}
    if ev.sum() == 0 or m.sum() < 3:
        return out
    if reference is not None and f"{e}_mask" in reference:
        rm = reference[f"{e}_mask"].astype(bool)
        r_risk, r_t, r_e = reference[e][rm].astype(np.float64), reference[f"{e}_time"][rm].astype(np.float64), \
            reference[f"{e}_event"][rm] > 0.5
    else:
        r_risk, r_t, r_e = risk, t, ev
    out["harrell_cindex"] = _ci(lambda r, tt, ee: metrics.concordance_index(r, tt, ee), risk, t, ev, groups=groups)
    ev_times = t[ev]
    tau = float(np.quantile(ev_times, 0.9)) if ev_times.size else None

    def uno(r, tt, ee):
        return metrics.concordance_index_ipcw(r, tt, ee, train_time=r_t, train_event=r_e, tau=tau)
    out["uno_cindex"] = _ci(uno, risk, t, ev, groups=groups)
    lo, hi = max(t.min(), r_t.min()), min(t.max(), r_t.max())
    qs = np.quantile(ev_times, [0.25, 0.5, 0.75])
    qs = np.unique(qs[(qs >= lo) & (qs < hi)])
    if qs.size:
        try:
            auc, mean_auc = metrics.cumulative_dynamic_auc(risk, t, ev, qs, train_time=r_t, train_event=r_e)
            out["td_auc_times"] = qs.tolist()
            out["td_auc"] = auc.tolist()
            out["td_auc_mean"] = float(mean_auc)
        except ValueError:
            pass
    grid = np.linspace(np.quantile(t, 0.1), np.quantile(t, 0.8), 10)
    grid = np.unique(grid[(grid >= lo) & (grid < hi)])
    if grid.size >= 2:
        surv = breslow_survival(r_risk, r_t, r_e, risk, grid)
        out["integrated_brier_score"] = _safe(metrics.integrated_brier_score, surv, t, ev, grid,
                                              train_time=r_t, train_event=r_e)
        km_t, km_s = metrics.kaplan_meier(r_t, r_e)  # the risk-free baseline: everyone gets the KM curve
        idx = np.searchsorted(km_t, grid, side="right") - 1
        base = np.where(idx >= 0, km_s[np.clip(idx, 0, None)], 1.0)
        out["integrated_brier_score_km"] = _safe(metrics.integrated_brier_score, np.tile(base, (t.size, 1)), t, ev,
                                                 grid, train_time=r_t, train_event=r_e)
    cut = float(np.median(r_risk))
    high = risk > cut
    out["risk_cut"] = cut
    if 0 < high.sum() < high.size:
        try:
            from lifelines.statistics import logrank_test

            out["logrank_p"] = float(logrank_test(t[high], t[~high], ev[high], ev[~high]).p_value)
        except Exception:  # lifelines missing or degenerate groups
            out["logrank_p"] = math.nan
    return out


def summary_metrics(task: str, pred: dict[str, Any], reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's metrics as a flat dict (``<endpoint>_<metric>`` and ``..._low``/``..._high``)."""
    flat: dict[str, Any] = {}
    if task == "survival":
        for e in ("pfs", "os"):
            if e not in pred or f"{e}_time" not in pred:
                continue
            for k, v in _survival_endpoint(e, pred, reference).items():
                if isinstance(v, tuple):
                    flat[f"{e}_{k}"], flat[f"{e}_{k}_low"], flat[f"{e}_{k}_high"] = v
                elif not isinstance(v, list):
                    flat[f"{e}_{k}"] = v
    else:
        from lungcore import metrics

        if "label" not in pred:
            return flat
        m = pred["label_mask"].astype(bool)
        y, p = pred["label"][m], pred["probability"][m].astype(np.float64)
        groups = np.asarray(pred["patient_id"])[m] if "patient_id" in pred else None
        flat["n"], flat["positives"] = int(m.sum()), int(y.sum())
        for name in ("roc_auc", "accuracy", "precision", "recall", "specificity", "f1"):
            est, lo, hi = _ci(lambda yy, pp, _n=name: metrics.classification_metrics(yy, pp)[_n], y, p, groups=groups)
            flat[name], flat[f"{name}_low"], flat[f"{name}_high"] = est, lo, hi
    return flat


def write_report(folder: Path, task: str, pred: dict[str, Any], *, reference: dict[str, Any] | None = None,
                 history: list[dict[str, Any]] | None = None, title: str = "lungcore report",
                 warnings: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``folder``/{summary.md, metrics.json, *.png}; return the metrics. ``warnings`` (what
    the run could not learn or select on) head the summary. ``metrics.json`` is strict JSON
    (an undefined metric is ``null``). An earlier report in ``folder`` is replaced: the files of
    :data:`REPORT_FILES` it holds are removed first (an old ``roc.png`` never sits beside a new
    survival report); any other file there stays."""
    from lungcore.usage import json_safe

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = summary_metrics(task, pred, reference)
    for name in REPORT_FILES:
        if (folder / name).is_file() or (folder / name).is_symlink():
            (folder / name).unlink()
    figures: list[str] = []
    if history:
        figures += _curves(folder, history, plt)
    if task == "survival":
        for e in ("pfs", "os"):
            if e in pred and f"{e}_time" in pred and f"{e}_risk_cut" in flat:
                figures.append(_km_plot(folder, e, pred, flat, plt))
    elif "label" in pred:
        figures += _classification_plots(folder, pred, flat, plt)
    (folder / "metrics.json").write_text(json.dumps(json_safe(flat), indent=1, allow_nan=False) + "\n")
    lines = [f"# {title}", ""] + [line for w in warnings for line in (f"> **Warning:** {w}", "")] + [
        "| metric | value | 95% CI |", "|---|---|---|"]
    for k, v in flat.items():
        if k.endswith("_low") or k.endswith("_high") or not isinstance(v, (int, float)):
            continue
        lo, hi = flat.get(f"{k}_low"), flat.get(f"{k}_high")
        ci = f"{lo:.3f} – {hi:.3f}" if lo is not None and math.isfinite(lo) else ""
        lines.append(f"| {k} | {v:.4g} | {ci} |" if isinstance(v, float) else f"| {k} | {v} | |")
    lines += ["", "Intervals: percentile bootstrap over patients "
                  f"({N_BOOT} resamples). " + ("Survival curves: Breslow baseline hazard of the training split; "
                                               "`*_integrated_brier_score_km`: the Kaplan-Meier curve for everyone "
                                               "(a no-skill reference). Risk groups split at the training median."
                                               if task == "survival" else "Threshold 0.5."), ""]
    lines += [f"![{f}]({f})" for f in figures]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    return flat


def _curves(folder: Path, history: list[dict[str, Any]], plt) -> list[str]:
    stages = list(dict.fromkeys(h["stage"] for h in history))
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [h for h in history if h["stage"] == stage]
        ep = [h["epoch"] for h in rows]
        ax.plot(ep, [h.get("train_loss", math.nan) for h in rows], label="train loss")
        if any("val_loss" in h for h in rows):
            ax.plot(ep, [h.get("val_loss", math.nan) for h in rows], label="val loss")
        ax.set_xlabel("epoch")
        ax.set_title(stage)
        metric = next((k for k in ("val_cindex", "val_roc_auc") if any(k in h for h in rows)), None)
        if metric:
            ax2 = ax.twinx()
            ax2.plot(ep, [h.get(metric, math.nan) for h in rows], color="tab:green", label=metric)
            ax2.set_ylabel(metric)
            ax2.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "training_curves.png", dpi=100)
    plt.close(fig)
    return ["training_curves.png"]


def _km_plot(folder: Path, e: str, pred: dict[str, Any], flat: dict[str, Any], plt) -> str:
    from lungcore.metrics import kaplan_meier

    m = pred[f"{e}_mask"].astype(bool)
    risk, t, ev = pred[e][m], pred[f"{e}_time"][m], pred[f"{e}_event"][m] > 0.5
    high = risk > flat[f"{e}_risk_cut"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, sel in (("low risk", ~high), ("high risk", high)):
        if sel.any():
            ut, s = kaplan_meier(t[sel], ev[sel])
            ax.step(np.concatenate(([0.0], ut)), np.concatenate(([1.0], s)), where="post",
                    label=f"{name} (n={int(sel.sum())})")
    p = flat.get(f"{e}_logrank_p", math.nan)
    ax.set_title(f"{e.upper()} by predicted risk group, log-rank p={p:.2g}", fontsize=10)
    ax.set_xlabel("time")
    ax.set_ylabel("survival")
    ax.legend()
    fig.tight_layout()
    name = f"km_{e}.png"
    fig.savefig(folder / name, dpi=100)
    plt.close(fig)
    return name


def _classification_plots(folder: Path, pred: dict[str, Any], flat: dict[str, Any], plt) -> list[str]:
    from lungcore.metrics import confusion_matrix, roc_curve

    m = pred["label_mask"].astype(bool)
    y, p = pred["label"][m], pred["probability"][m]
    names = []
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_curve(y, p)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, label=f"AUC {flat.get('roc_auc', math.nan):.3f}")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / "roc.png", dpi=100)
        plt.close(fig)
        names.append("roc.png")
    cm = confusion_matrix(y, p >= 0.5)
    fig, ax = plt.subplots(figsize=(3.5, 3.5))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(int(v)), ha="center", va="center")
    ax.set_xticks([0, 1], ["benign", "malignant"])
    ax.set_yticks([0, 1], ["benign", "malignant"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(folder / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    names.append("confusion_matrix.png")
    return names
