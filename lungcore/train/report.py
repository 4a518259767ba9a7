"""Evaluation reports: metric tables with bootstrap CIs, plots (PNG) and a Markdown summary.

Survival (CMML), per endpoint (PFS, OS): Harrell's and Uno's C-index, time-dependent AUC at the
quartiles of the event times, the integrated Brier score of Breslow survival curves (baseline
hazard fitted on a reference's risks: the training split after ``fit``, ``--reference-manifest`` or
the evaluated cohort itself in ``evaluate``), and Kaplan-Meier curves of the high / low risk
groups (split at the reference's median risk) with the log-rank p-value (lifelines). Every metric
is reported; an undefined one is NaN (``null`` in JSON) with a note saying why.
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
    2.6291), events and labels are integers; a row without the endpoint has empty time and event
    cells, a nodule without a label an empty label cell (a non-finite output: an empty cell too)."""
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
        if "label" in pred:  # a row without a label: an empty cell (as an absent endpoint's time and event)
            known = np.asarray(pred.get("label_mask", np.ones(len(pred["id"]), bool))).astype(bool)
            labels = np.asarray(pred["label"]).round().astype(np.int64)
            cols["label"] = pd.array([int(v) if k else pd.NA for v, k in zip(labels, known)], dtype="Int64")
    return pd.DataFrame(cols)


def write_predictions(pred: dict[str, Any], task: str, path: Path) -> Path:
    predictions_frame(pred, task).to_csv(path, index=False)
    return path


def _safe(fn, *args, _reasons: list[str] | None = None, **kw) -> float:
    """``fn(*args, **kw)`` as a float; NaN where it is undefined (its error appended to ``_reasons``)."""
    try:
        v = float(fn(*args, **kw))
    except (ValueError, ZeroDivisionError, FloatingPointError) as exc:
        if _reasons is not None:
            _reasons.append(str(exc))
        return math.nan
    return v


def _ci(metric, *arrays, groups=None, _reasons: list[str] | None = None) -> tuple[float, float, float]:
    """(estimate, low, high); where the bootstrap fails, the estimate alone (and why in ``_reasons``)."""
    from lungcore.metrics import bootstrap_ci

    try:
        return bootstrap_ci(metric, *arrays, n_boot=N_BOOT, groups=groups)
    except ValueError as exc:
        if _reasons is not None:
            _reasons.append(str(exc))
        return _safe(metric, *arrays, _reasons=_reasons), math.nan, math.nan


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _interval_reason(n: int, reasons: list[str]) -> str:
    why = next((r for r in reasons if r.startswith("bootstrap_ci: ")), "")
    why = why[len("bootstrap_ci: "):] if why else "the bootstrap failed"
    return f"no 95% interval from {n} row{'s' if n != 1 else ''} ({why})"


# the survival metrics of every endpoint (also keys of metrics.json when undefined: null)
SURVIVAL_METRICS = ("harrell_cindex", "uno_cindex", "td_auc_mean", "integrated_brier_score",
                    "integrated_brier_score_km", "risk_cut", "logrank_p")
CLASSIFICATION_METRICS = ("roc_auc", "accuracy", "precision", "recall", "specificity", "f1")
_WITH_CI = ("harrell_cindex", "uno_cindex")


def _survival_endpoint(e: str, pred: dict[str, Any], reference: dict[str, Any] | None,
                       why: dict[str, str] | None = None, reference_name: str = "the reference cohort"
                       ) -> dict[str, Any]:
    """Every metric of endpoint ``e`` (NaN where undefined); ``why[metric]`` says why one is NaN.
    ``reference`` (named ``reference_name`` in those reasons): the predictions the Breslow baseline,
    the censoring weights and the risk-group cut come from; None: the evaluated rows themselves."""
    from lungcore import metrics

    why = {} if why is None else why
    nan3 = (math.nan, math.nan, math.nan)
    m = pred[f"{e}_mask"].astype(bool)
    risk, t, ev = pred[e][m].astype(np.float64), pred[f"{e}_time"][m].astype(np.float64), pred[f"{e}_event"][m] > 0.5
    groups = np.asarray(pred["patient_id"])[m] if "patient_id" in pred else None
    n, events = int(m.sum()), int(ev.sum())
    out: dict[str, Any] = {"n": n, "events": events}
    out.update({k: nan3 if k in _WITH_CI else math.nan for k in SURVIVAL_METRICS})
    rows = f"{n} row{'s' if n != 1 else ''} with the {e} endpoint"
    if n == 0:
        why.update(dict.fromkeys(SURVIVAL_METRICS, f"no row has the {e} endpoint (a {e}_time and a {e}_event)"))
        return out
    if reference is not None and f"{e}_mask" in reference:
        rm = reference[f"{e}_mask"].astype(bool)
        r_risk, r_t, r_e = reference[e][rm].astype(np.float64), reference[f"{e}_time"][rm].astype(np.float64), \
            reference[f"{e}_event"][rm] > 0.5
        ref = reference_name
    else:
        r_risk, r_t, r_e = risk, t, ev
        ref = "the evaluated rows"
    if r_t.size == 0:
        why.update(dict.fromkeys(("uno_cindex", "td_auc_mean", "integrated_brier_score", "integrated_brier_score_km",
                                  "risk_cut", "logrank_p"), f"{ref} has no row with the {e} endpoint"))
    else:
        out["risk_cut"] = float(np.median(r_risk))
    if events == 0:
        no_event = f"no {e} event among the {rows} (every one censored)"
        why.update({k: no_event for k in SURVIVAL_METRICS if k != "risk_cut" and k not in why})
        return out

    def with_ci(name: str, metric, undefined: str | None = None) -> None:
        """``out[name]`` = (estimate, low, high) of ``metric``; why it (or only its interval) is NaN in ``why``:
        ``undefined``, else the metric's own error."""
        reasons: list[str] = []
        out[name] = est = _ci(metric, risk, t, ev, groups=groups, _reasons=reasons)
        if _isnan(est[0]):
            own = next((r for r in reasons if not r.startswith("bootstrap_ci: ")), "undefined on these rows")
            why[name] = undefined if undefined and own.startswith("no comparable pair") else own
        elif _isnan(est[1]):
            why[f"{name}_low/_high"] = _interval_reason(n, reasons)

    no_pair = (f"no comparable pair among the {rows} ({events} event{'s' if events != 1 else ''}, none "
               "followed by a later time): the C-index needs one")
    with_ci("harrell_cindex", lambda r, tt, ee: metrics.concordance_index(r, tt, ee), no_pair)
    if why.get("harrell_cindex") == no_pair:  # no comparable pair: nothing else that ranks is defined either
        why.update({k: no_pair for k in SURVIVAL_METRICS if k != "risk_cut" and k not in why})
        return out
    if r_t.size == 0:
        return out
    ev_times = t[ev]
    tau = float(np.quantile(ev_times, 0.9))

    def uno(r, tt, ee):
        return metrics.concordance_index_ipcw(r, tt, ee, train_time=r_t, train_event=r_e, tau=tau)
    with_ci("uno_cindex", uno)
    if why.get("uno_cindex", "").startswith("no comparable pair"):  # the metric's message names its API switch
        why["uno_cindex"] = (f"no comparable pair with the earlier time before tau {tau:.4g} (the 90th percentile "
                             f"of the {e} event times)")
    lo, hi = max(t.min(), r_t.min()), min(t.max(), r_t.max())
    span = (f"the follow-up that the evaluated rows and {ref} share ({lo:.4g} to {hi:.4g})" if reference is not None
            else f"the follow-up of the evaluated rows ({lo:.4g} to {hi:.4g})")
    qs = np.quantile(ev_times, [0.25, 0.5, 0.75])
    qs = np.unique(qs[(qs >= lo) & (qs < hi)])
    if qs.size:
        try:
            auc, mean_auc = metrics.cumulative_dynamic_auc(risk, t, ev, qs, train_time=r_t, train_event=r_e)
            out["td_auc_times"] = qs.tolist()
            out["td_auc"] = auc.tolist()
            out["td_auc_mean"] = float(mean_auc)
            if _isnan(out["td_auc_mean"]):
                why["td_auc_mean"] = "no case / control pair at the quartiles of the event times"
        except ValueError as exc:
            why["td_auc_mean"] = str(exc)
    else:
        why["td_auc_mean"] = f"no quartile of the {e} event times lies before the end of {span}"
    grid = np.linspace(np.quantile(t, 0.1), np.quantile(t, 0.8), 10)
    grid = np.unique(grid[(grid >= lo) & (grid < hi)])
    if grid.size >= 2:
        reasons = []
        out["integrated_brier_score"] = _safe(lambda: metrics.integrated_brier_score(
            breslow_survival(r_risk, r_t, r_e, risk, grid), t, ev, grid, train_time=r_t, train_event=r_e),
            _reasons=reasons)
        km_t, km_s = metrics.kaplan_meier(r_t, r_e)  # the risk-free baseline: everyone gets the KM curve
        idx = np.searchsorted(km_t, grid, side="right") - 1
        base = np.where(idx >= 0, km_s[np.clip(idx, 0, None)], 1.0)
        out["integrated_brier_score_km"] = _safe(metrics.integrated_brier_score, np.tile(base, (t.size, 1)), t, ev,
                                                 grid, train_time=r_t, train_event=r_e, _reasons=reasons)
        for k in ("integrated_brier_score", "integrated_brier_score_km"):
            if _isnan(out[k]):
                why[k] = reasons[0] if reasons else "undefined on these rows"
    else:
        no_grid = f"fewer than 2 distinct times to integrate over within {span}"
        why["integrated_brier_score"] = why["integrated_brier_score_km"] = no_grid
    cut = out["risk_cut"]
    high = risk > cut
    if 0 < high.sum() < high.size:
        try:
            from lifelines.statistics import logrank_test

            out["logrank_p"] = float(logrank_test(t[high], t[~high], ev[high], ev[~high]).p_value)
        except Exception as exc:  # lifelines missing or degenerate groups
            why["logrank_p"] = f"the log-rank test failed ({type(exc).__name__}: {exc})"
    else:
        why["logrank_p"] = (f"every row is in the {'high' if high.all() else 'low'}-risk group (split at the median "
                            f"risk of {ref}, {cut:.4g})")
    return out


def _classification_reasons(y: np.ndarray, p: np.ndarray, flat: dict[str, Any]) -> dict[str, str]:
    """Why each NaN classification metric is undefined."""
    n, positives = int(y.size), int(y.sum())
    if n == 0:
        return dict.fromkeys(CLASSIFICATION_METRICS, "no row has a label")
    known = {"roc_auc": f"only one class among the {n} labelled rows ({positives} malignant): ROC AUC needs both",
             "recall": "no malignant label among the labelled rows",
             "specificity": "no benign label among the labelled rows",
             "precision": "no row is predicted malignant (probability >= 0.5)",
             "f1": "precision or recall is undefined, or both are 0"}
    why = {}
    for name in CLASSIFICATION_METRICS:
        if _isnan(flat.get(name)):
            why[name] = known.get(name, "undefined on these rows")
        elif _isnan(flat.get(f"{name}_low")):
            why[f"{name}_low/_high"] = _interval_reason(n, ["bootstrap_ci: the metric was undefined on most "
                                                            "resamples of patients"])
    return why


def _notes(prefix: str, why: dict[str, str]) -> list[str]:
    """One line per reason: the metrics it leaves null, then why."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in why.items():
        by_reason.setdefault(reason, []).append(f"{prefix}{key}")
    return [f"{', '.join(keys)} {'is' if len(keys) == 1 and '/' not in keys[0] else 'are'} null: {reason}"
            for reason, keys in by_reason.items()]


def summary_metrics(task: str, pred: dict[str, Any], reference: dict[str, Any] | None = None,
                    notes: list[str] | None = None, reference_name: str = "the reference cohort") -> dict[str, Any]:
    """The report's metrics as a flat dict (``<endpoint>_<metric>`` and ``..._low``/``..._high``).

    Every metric is there: an undefined one is NaN (``null`` in JSON), and a line appended to
    ``notes`` (when given) says why, e.g. ``os_harrell_cindex, ... are null: no os event among the
    2 rows with the os endpoint (every one censored)``.

    Example:
        >>> import numpy as np
        >>> pred = {"os": np.array([0.3]), "os_time": np.array([5.0]), "os_event": np.array([1.0]),
        ...         "os_mask": np.array([True])}
        >>> notes = []
        >>> flat = summary_metrics("survival", pred, notes=notes)
        >>> flat["os_n"], flat["os_harrell_cindex"]
        (1, nan)
        >>> print(notes[0])
        os_harrell_cindex, os_uno_cindex, ..., os_logrank_p are null: no comparable pair among the 1 row with the
        os endpoint (1 event, none followed by a later time): the C-index needs one
    """
    flat: dict[str, Any] = {}
    why_all: list[str] = []
    if task == "survival":
        for e in ("pfs", "os"):
            if e not in pred or f"{e}_time" not in pred:
                continue
            why: dict[str, str] = {}
            for k, v in _survival_endpoint(e, pred, reference, why, reference_name).items():
                if isinstance(v, tuple):
                    flat[f"{e}_{k}"], flat[f"{e}_{k}_low"], flat[f"{e}_{k}_high"] = v
                elif not isinstance(v, list):
                    flat[f"{e}_{k}"] = v
            why_all += _notes(f"{e}_", why)
    else:
        from lungcore import metrics

        if "label" in pred and "label_mask" in pred:
            m = pred["label_mask"].astype(bool)
            y, p = pred["label"][m], pred["probability"][m].astype(np.float64)
            groups = np.asarray(pred["patient_id"])[m] if "patient_id" in pred else None
        else:
            y, p, groups = np.zeros(0, np.int64), np.zeros(0), None
        flat["n"], flat["positives"] = int(y.size), int(y.sum())
        for name in CLASSIFICATION_METRICS:
            if y.size:
                est, lo, hi = _ci(lambda yy, pp, _n=name: metrics.classification_metrics(yy, pp)[_n], y, p,
                                  groups=groups)
            else:
                est = lo = hi = math.nan
            flat[name], flat[f"{name}_low"], flat[f"{name}_high"] = est, lo, hi
        why_all += _notes("", _classification_reasons(y, p, flat))
    if notes is not None:
        notes += why_all
    return flat


def write_report(folder: Path, task: str, pred: dict[str, Any], *, reference: dict[str, Any] | None = None,
                 history: list[dict[str, Any]] | None = None, title: str = "lungcore report",
                 warnings: Sequence[str] = (), reference_name: str | None = None,
                 notes: list[str] | None = None) -> dict[str, Any]:
    """Write ``folder``/{summary.md, metrics.json, *.png}; return the metrics. ``warnings`` (what
    the run could not learn or select on) head the summary. ``metrics.json`` is strict JSON
    (an undefined metric is ``null``; the summary says why, and so do the lines appended to
    ``notes`` when given). ``reference_name``: what ``reference`` is, as the summary names the
    source of the Breslow baseline, the censoring weights and the risk-group cut ("the training
    split"; default "the reference cohort"; without ``reference``: the evaluated cohort itself).
    An earlier report in ``folder`` is replaced: the files of :data:`REPORT_FILES` it holds are
    removed first (an old ``roc.png`` never sits beside a new survival report); any other file
    there stays."""
    from lungcore.usage import json_safe

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = (reference_name or "the reference cohort") if reference is not None else "the evaluated cohort itself"
    why: list[str] = []
    flat = summary_metrics(task, pred, reference, notes=why, reference_name=source)
    if notes is not None:
        notes += why
    for name in REPORT_FILES:
        if (folder / name).is_file() or (folder / name).is_symlink():
            (folder / name).unlink()
    figures: list[str] = []
    if history:
        figures += _curves(folder, history, plt)
    if task == "survival":
        for e in ("pfs", "os"):
            if e in pred and f"{e}_time" in pred and flat.get(f"{e}_n", 0) > 0 \
                    and math.isfinite(flat.get(f"{e}_risk_cut", math.nan)):
                figures.append(_km_plot(folder, e, pred, flat, plt))
    elif "label" in pred and flat.get("n", 0) > 0:
        figures += _classification_plots(folder, pred, flat, plt)
    (folder / "metrics.json").write_text(json.dumps(json_safe(flat), indent=1, allow_nan=False) + "\n")
    lines = [f"# {title}", ""] + [line for w in warnings for line in (f"> **Warning:** {w}", "")] + [
        "| metric | value | 95% CI |", "|---|---|---|"]
    for k, v in flat.items():
        if k.endswith("_low") or k.endswith("_high") or not isinstance(v, (int, float)):
            continue
        lo, hi = flat.get(f"{k}_low"), flat.get(f"{k}_high")
        ci = f"{lo:.3f} – {hi:.3f}" if lo is not None and math.isfinite(lo) and math.isfinite(hi) else ""
        value = ("undefined" if math.isnan(v) else f"{v:.4g}") if isinstance(v, float) else v
        lines.append(f"| {k} | {value} | {ci} |")
    if why:
        lines += ["", "Undefined metrics (`null` in metrics.json):", ""] + [f"- {w}" for w in why]
    lines += ["", "Intervals: percentile bootstrap over patients "
                  f"({N_BOOT} resamples). " + (f"Survival curves: Breslow baseline hazard of {source}; censoring "
                                               f"weights (Uno's C-index, time-dependent AUC, Brier score) from "
                                               f"{source}; `*_integrated_brier_score_km`: everyone given the "
                                               f"Kaplan-Meier curve of {source} (a no-skill reference). Risk groups "
                                               f"split at the median risk of {source}."
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
