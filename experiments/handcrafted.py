"""The handcrafted baselines of the non-linear experiments (not CI): radiomics-style features + a linear
model or gradient-boosted trees; and the report pieces both scripts share.

Features are those ``lungcore.data.synth`` measures on each lesion's *true* mask at the source
resolution (``truth.csv`` columns ``feat_*``, :func:`lungcore.data.synth.lesion_features`: volume,
equivalent diameter, surface, sphericity, elongation, flatness, mean, SD, 10th/90th percentiles,
skewness, kurtosis, entropy, solid fraction above -300 HU): a radiomics pipeline with a perfect
segmentation, the strongest honest handcrafted baseline. The models are lifelines' ``CoxPHFitter``
(survival) and a ridge-free logistic regression (``csfnet_synthetic.logistic_fit_predict``) on
the standardised features, plus the clinical variables. The boosted trees (scikit-learn's
``HistGradientBoostingClassifier``, scikit-survival's ``GradientBoostingSurvivalAnalysis`` with the Cox
loss) see the same columns and can learn what a linear model cannot: interactions and thresholds.
Their learning rate, tree size and number of trees are chosen on the validation split (as the
networks choose their epoch), then they are refitted on train + validation (as the linear models are).
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


BOOSTED_GRID = ({"learning_rate": 0.05, "size": 2}, {"learning_rate": 0.05, "size": 3},
                {"learning_rate": 0.1, "size": 2}, {"learning_rate": 0.1, "size": 3})
BOOSTED_MAX_TREES = 1000


def boosted_fit_predict(fit: tuple[pd.DataFrame, np.ndarray, np.ndarray | None],
                        val: tuple[pd.DataFrame, np.ndarray, np.ndarray | None],
                        test_x: pd.DataFrame, seed: int = 0, max_trees: int = BOOSTED_MAX_TREES,
                        ) -> tuple[np.ndarray, dict]:
    """Gradient-boosted trees on the training split ``fit`` = ``(x, label, None)`` (classification: test
    probabilities) or ``(x, time, event)`` (survival, Cox loss: test log-hazards). Each setting of
    :data:`BOOSTED_GRID` (``size``: tree depth) is grown to ``max_trees`` trees on ``fit``, scored after
    every tree on ``val`` (AUC / Harrell's C); the best setting and tree count are refitted on ``fit`` +
    ``val`` and applied to ``test_x``. A validation split that cannot score (one class, no comparable
    pair: smoke-test cohorts) leaves the first setting at ``max_trees // 10`` trees. Returns the
    predictions and the choice (``{"learning_rate", "size", "trees", "val_score"}``)."""
    from lungcore.metrics import concordance_index, roc_auc

    survival = fit[2] is not None
    x_fit, x_val, test_x = standardise(fit[0], val[0], test_x)   # trees need no scaling; it fills the gaps
    fit, val = (x_fit, *fit[1:]), (x_val, *val[1:])
    best: dict = {**BOOSTED_GRID[0], "trees": max(1, max_trees // 10), "val_score": float("nan")}
    scorable = (survival and concordance_index(np.zeros(len(val[1])), val[1], val[2], no_pairs="nan",
                                               return_counts=True).comparable > 0
                or not survival and 0 < np.sum(val[1]) < len(val[1]))
    for setting in BOOSTED_GRID if scorable else ():
        model = _boosted(setting, max_trees, survival, seed).fit(fit[0], _target(*fit[1:]))
        stages = model.staged_predict(val[0]) if survival else (p[:, 1] for p in model.staged_predict_proba(val[0]))
        for trees, pred in enumerate(stages, start=1):
            score = float(concordance_index(pred, val[1], val[2]) if survival else roc_auc(val[1], pred))
            if not score <= best["val_score"]:   # the first score replaces the NaN
                best = {**setting, "trees": trees, "val_score": score}
    both = pd.concat([fit[0], val[0]], ignore_index=True)
    target = _target(np.concatenate([fit[1], val[1]]), None if not survival else np.concatenate([fit[2], val[2]]))
    model = _boosted(best, best["trees"], survival, seed).fit(both, target)
    return (model.predict(test_x) if survival else model.predict_proba(test_x)[:, 1]), best


def _boosted(setting: dict, trees: int, survival: bool, seed: int):
    if survival:
        from sksurv.ensemble import GradientBoostingSurvivalAnalysis

        return GradientBoostingSurvivalAnalysis(loss="coxph", learning_rate=setting["learning_rate"],
                                                max_depth=setting["size"], n_estimators=trees, random_state=seed)
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(learning_rate=setting["learning_rate"], max_depth=setting["size"],
                                          max_iter=trees, early_stopping=False, random_state=seed)


def _target(y: np.ndarray, event: np.ndarray | None):
    """scikit-survival's structured (event, time) array for survival; the labels otherwise."""
    if event is None:
        return np.asarray(y).astype(int)
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(y, dtype=float))


def saved_predictions(path: Path, key: str, ids, prefix: str) -> dict[str, np.ndarray]:
    """The columns of an earlier run's test-prediction CSV (``test_risks.csv`` / ``test_probabilities.csv``)
    whose names start with ``prefix`` (a network's rows), checked to be for exactly ``ids`` in that order
    (the same cohort and split), so that new baselines can be compared with networks already trained."""
    saved = pd.read_csv(path, dtype={key: str})
    if saved[key].tolist() != [str(i) for i in ids]:
        raise SystemExit(f"{path}: its {key} column is not this run's test split (another cohort, seed or split)")
    cols = {c: saved[c].to_numpy(dtype=float) for c in saved.columns if c.startswith(prefix)}
    if not cols:
        raise SystemExit(f"{path}: no column starts with {prefix!r}")
    return cols


def baseline_arguments(ap: argparse.ArgumentParser, network: str, csv_name: str) -> None:
    """``--boosted-trees`` (the boosted baseline's largest tree count) and ``--networks-from`` (take the
    network's test predictions from an earlier run instead of training)."""
    ap.add_argument("--boosted-trees", type=int, default=BOOSTED_MAX_TREES,
                    help=f"the boosted-trees baseline's largest number of trees (default {BOOSTED_MAX_TREES})")
    ap.add_argument("--networks-from", type=Path, default=None, metavar="CSV",
                    help=f"take {network}'s test predictions from an earlier run's {csv_name} (same cohort and "
                         "split, checked) instead of training; copy it first, this run rewrites the workdir's")


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

