"""Metrics: survival (Harrell's and Uno's C-index, time-dependent AUC, Brier score, Kaplan-Meier),
classification (ROC AUC, curve, confusion matrix, thresholded metrics) and bootstrap intervals.

Conventions used everywhere in lungcore:
    * argument order ``(risk, time, event)``, all usable as keywords;
    * higher ``risk`` = earlier event (pass ``-predicted_survival_time`` for time predictions);
    * inputs may be numpy arrays, CPU or CUDA torch tensors, CuPy arrays or sequences.

Modules: :mod:`~lungcore.metrics.concordance` (the C-index and its tie rules),
:mod:`~lungcore.metrics.survival`, :mod:`~lungcore.metrics.classification`,
:mod:`~lungcore.metrics.bootstrap`.

Example:
    >>> from lungcore.metrics import concordance_index
    >>> concordance_index(risk=[3.0, 2.0, 1.0], time=[1.0, 2.0, 3.0], event=[1, 1, 0])
    1.0
"""
from lungcore.metrics.bootstrap import bootstrap_ci
from lungcore.metrics.classification import classification_metrics, confusion_matrix, roc_auc, roc_curve
from lungcore.metrics.concordance import (Concordance, concordance_index, concordance_index_ipcw,
                                          concordance_index_reference)
from lungcore.metrics.survival import (brier_score, censoring_survival, cumulative_dynamic_auc,
                                       integrated_brier_score, kaplan_meier)

__all__ = [
    "Concordance",
    "concordance_index",
    "concordance_index_reference",
    "concordance_index_ipcw",
    "cumulative_dynamic_auc",
    "kaplan_meier",
    "censoring_survival",
    "roc_auc",
    "roc_curve",
    "confusion_matrix",
    "classification_metrics",
    "bootstrap_ci",
    "brier_score",
    "integrated_brier_score",
]
