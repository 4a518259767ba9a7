"""Classification metrics and bootstrap intervals against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest

from lungcore.metrics import bootstrap_ci, classification_metrics, confusion_matrix, roc_auc, roc_curve

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("n", [2, 9, 100, 1001])
def test_against_sklearn_with_ties(rng, n):
    y = rng.random(n) < 0.4
    y[0], y[-1] = True, False
    p = np.round(rng.random(n), 1)           # many ties
    assert abs(roc_auc(y, p) - sk.roc_auc_score(y, p)) < 1e-12
    fpr, tpr, _ = roc_curve(y, p)
    fpr2, tpr2, _ = sk.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr2)
    np.testing.assert_allclose(tpr, tpr2)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, p), abs=1e-12)
    pred = p >= 0.5
    np.testing.assert_array_equal(confusion_matrix(y, pred), sk.confusion_matrix(y, pred, labels=[0, 1]))
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(sk.precision_score(y, pred, zero_division=np.nan), nan_ok=True)
    assert m["recall"] == pytest.approx(sk.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(sk.recall_score(~y, ~pred))
    assert m["f1"] == pytest.approx(sk.f1_score(y, pred, zero_division=np.nan), nan_ok=True)


def test_errors_and_degenerate_cases():
    with pytest.raises(ValueError, match="single class"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0, 1], [0.2])
    with pytest.raises(ValueError, match=r"label\[1\] is 2.0"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"probability\[0\] is nan"):
        roc_auc([0, 1], [np.nan, 0.2])
    m = classification_metrics([0, 0, 1], [0.1, 0.2, 0.3])   # nothing predicted positive
    assert np.isnan(m["precision"]) and m["recall"] == 0.0


def test_bootstrap_interval_covers_and_is_reproducible(rng):
    n = 400
    y = rng.random(n) < 0.5
    p = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
    est, lo, hi = bootstrap_ci(roc_auc, y, p, n_boot=200, seed=3)
    assert lo < est < hi and hi - lo < 0.15
    assert bootstrap_ci(roc_auc, y, p, n_boot=200, seed=3) == (est, lo, hi)
    groups = np.repeat(np.arange(n // 2), 2)
    est_g, lo_g, hi_g = bootstrap_ci(roc_auc, y, p, n_boot=200, seed=3, groups=groups)
    assert est_g == est and lo_g < est < hi_g
    def fragile(label, prob):  # defined on the full data, undefined on most resamples
        if len(set(np.asarray(prob).tolist())) < len(prob):
            raise ValueError("repeated subject")
        return 0.5
    with pytest.raises(ValueError, match="undefined on"):
        bootstrap_ci(fragile, [0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], n_boot=50)
