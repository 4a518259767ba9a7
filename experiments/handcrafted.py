"""The handcrafted baselines of the non-linear experiments (not CI): radiomics-style features + a linear
model; and the report pieces both scripts share.

Features are those ``lungcore.data.synth`` measures on each lesion's *true* mask at the source
resolution (``truth.csv`` columns ``feat_*``, :func:`lungcore.data.synth.lesion_features`: volume,
equivalent diameter, surface, sphericity, elongation, flatness, mean, SD, 10th/90th percentiles,
skewness, kurtosis, entropy, solid fraction above -300 HU): a radiomics pipeline with a perfect
segmentation, the strongest honest handcrafted baseline. The models are lifelines' ``CoxPHFitter``
(survival) and a ridge-free logistic regression (``csfnet_synthetic.logistic_fit_predict``) on
the standardised features, plus the clinical variables.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lungcore.data.synth import EFFECTS, FEATURES


def truth_features(truth_csv: Path, key: str, ids, prefixes=("feat_",)) -> pd.DataFrame:
    """The ``feat_*`` columns of ``truth.csv`` (one per prefix, e.g. ``feat_t0_``/``feat_t1_``)
    for ``ids`` in that order; a lesion without features (no CT) gets the training mean later."""
    truth = pd.read_csv(truth_csv, dtype={key: str}).set_index(key)
    cols = [f"{p}{f}" for p in prefixes for f in FEATURES]
    return truth.loc[list(ids), cols].reset_index(drop=True).astype(float)


def with_changes(df: pd.DataFrame) -> pd.DataFrame:
    """Add T1 - T0 differences of every feature (what a linear model needs to see change)."""
    out = df.copy()
    for f in FEATURES:
        out[f"delta_{f}"] = df[f"feat_t1_{f}"] - df[f"feat_t0_{f}"]
    return out


def standardise(train: pd.DataFrame, *others: pd.DataFrame) -> list[pd.DataFrame]:
    """z-score with the training split's mean/SD (missing -> the training mean, i.e. 0)."""
    mu, sd = train.mean(), train.std().replace(0.0, 1.0).fillna(1.0)
    return [((d - mu) / sd).fillna(0.0) for d in (train, *others)]


def cox_fit_predict(train_x: pd.DataFrame, time: np.ndarray, event: np.ndarray, test_x: pd.DataFrame,
                    penalizer: float = 0.01) -> np.ndarray:
    """Log partial hazards on ``test_x`` of a Cox model fitted on ``train_x`` (lifelines)."""
    from lifelines import CoxPHFitter

    tr, te = standardise(train_x, test_x)
    df = tr.assign(T=np.asarray(time, dtype=float), E=np.asarray(event, dtype=float))
    cph = CoxPHFitter(penalizer=penalizer).fit(df, "T", "E")
    return cph.predict_log_partial_hazard(te).to_numpy()


def learned_terms(risk: np.ndarray, terms: pd.DataFrame) -> dict[str, float]:
    """What a model's risk responds to: least-squares coefficients of the standardised risk on the
    planted terms (``terms``: one column per term of the generator's formula, as drawn), so that a
    model that ignores a term gets about 0 there and the oracle gets the formula's weights (up to
    the common scale). Rows with a missing risk or term are left out."""
    x = terms.to_numpy(dtype=float)
    y = np.asarray(risk, dtype=float)
    ok = np.isfinite(y) & np.isfinite(x).all(axis=1)
    y = (y[ok] - y[ok].mean()) / (y[ok].std() or 1.0)
    design = np.c_[np.ones(ok.sum()), x[ok]]
    coef = np.linalg.lstsq(design, y, rcond=None)[0][1:]
    return dict(zip(terms.columns, map(float, coef)))


def cohort_arguments(ap: argparse.ArgumentParser, network: str) -> None:
    """``--cohorts`` (which generators to write and fit) and ``--networks-on`` (where ``network`` trains)."""
    ap.add_argument("--cohorts", nargs="+", choices=EFFECTS, default=["linear", "morphology"],
                    help="which cohorts (the generator's effects) to write and fit (default: linear morphology)")
    ap.add_argument("--networks-on", nargs="+", choices=(*EFFECTS, "both"), default=["morphology"],
                    help=f"the cohorts {network} is trained on ('both': every cohort; default: morphology)")


def trains_on(args: argparse.Namespace, effects: str) -> bool:
    """Whether the network trains on the ``effects`` cohort (:func:`cohort_arguments`)."""
    return effects in args.networks_on or "both" in args.networks_on


def learned_table(learned: list[dict], key: str) -> list[str]:
    """Markdown tables (one per cohort) of :func:`learned_terms` rows ``{"effects", "model", key: terms}``."""
    md: list[str] = []
    for effects in dict.fromkeys(r["effects"] for r in learned):  # in the order the cohorts ran
        sub = [r for r in learned if r["effects"] == effects]
        if not sub:
            continue
        names = list(sub[0][key])
        md += [f"| {effects} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        md += [f"| {r['model']} | " + " | ".join(f"{r[key][k]:+.2f}" for k in names) + " |" for r in sub]
        md.append("")
    return md


def preset_text(name: str) -> str:
    """``"48 x 128 x 128 voxels at 2 x 1 x 1 mm"`` for a synthetic preset."""
    from lungcore.data.synth import PRESETS

    p = PRESETS[name]
    return f"{' x '.join(map(str, p.shape))} voxels at {' x '.join(f'{s:g}' for s in p.spacing)} mm"


def write_rows_csv(path: Path, rows: list[dict]) -> None:
    """Result rows as CSV, floats to 4 decimals."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)

