"""Classification metrics (nodule malignancy): ROC AUC and curve, confusion matrix, the
thresholded metrics.

Example:
    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
"""
from __future__ import annotations

import math

import numpy as np

from lungcore import checks
from lungcore.checks import ArrayLike


def _binary_inputs(label: ArrayLike, score: ArrayLike, score_name: str = "probability") -> tuple[np.ndarray, np.ndarray]:
    y = checks.binary("label", label)
    s = checks.finite(score_name, checks.host_1d(score_name, score))
    checks.same_length(label=y, **{score_name: s})
    return y, s


def roc_auc(label: ArrayLike, probability: ArrayLike) -> float:
    """Area under the ROC curve = P(score_positive > score_negative), ties counting one half.

    Equals ``sklearn.metrics.roc_auc_score``. ``ValueError`` when only one class is present.

    Example:
        >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    y, s = _binary_inputs(label, probability)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("label holds a single class: ROC AUC is undefined")
    negatives = np.sort(s[~y])
    less = np.searchsorted(negatives, s[y], side="left")
    tie = np.searchsorted(negatives, s[y], side="right") - less
    return float((less.sum() + 0.5 * tie.sum()) / (n_pos * n_neg))


def roc_curve(label: ArrayLike, probability: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds decreasing, from (0, 0).

    Example:
        >>> fpr, tpr, thr = roc_curve([0, 1], [0.2, 0.9])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    """
    y, s = _binary_inputs(label, probability)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(tp[-1], 1)]
    fpr = np.r_[0.0, fp / max(fp[-1], 1)]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def confusion_matrix(label: ArrayLike, prediction: ArrayLike) -> np.ndarray:
    """2x2 counts [[TN, FP], [FN, TP]] (rows = truth, columns = prediction), as scikit-learn.

    Example:
        >>> confusion_matrix([0, 1, 1, 0], [0, 1, 0, 1]).tolist()
        [[1, 1], [1, 1]]
    """
    y = checks.binary("label", label)
    p = checks.binary("prediction", prediction)
    checks.same_length(label=y, prediction=p)
    return np.array([[int((~y & ~p).sum()), int((~y & p).sum())],
                     [int((y & ~p).sum()), int((y & p).sum())]])


def classification_metrics(label: ArrayLike, probability: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall (sensitivity), specificity, F1 at ``threshold``, and ROC AUC.

    A ratio whose denominator is 0 (e.g. precision with no positive prediction) is NaN.

    Example:
        >>> m = classification_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9])
        >>> m["accuracy"], m["recall"], m["specificity"]
        (0.75, 1.0, 0.5)
    """
    y, s = _binary_inputs(label, probability)
    (tn, fp), (fn, tp) = confusion_matrix(y, s >= threshold)
    ratio = lambda a, b: float(a / b) if b else math.nan  # noqa: E731
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    out = {
        "accuracy": ratio(tp + tn, y.size),
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }
    out["roc_auc"] = roc_auc(y, s) if 0 < y.sum() < y.size else math.nan
    return out
