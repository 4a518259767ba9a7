"""brier_score / integrated_brier_score against scikit-survival on a real cohort (lifelines' rossi)."""
from __future__ import annotations

import numpy as np
import pytest

from lungcore.metrics import brier_score, integrated_brier_score
from lungcore.train.report import breslow_survival

sksurv_metrics = pytest.importorskip("sksurv.metrics")
from sksurv.util import Surv  # noqa: E402


def _rossi():
    from lifelines.datasets import load_rossi

    df = load_rossi()
    x = df[["fin", "age", "prio"]].to_numpy(float)
    risk = x @ np.array([-0.38, -0.06, 0.09])
    return risk, df["week"].to_numpy(float), df["arrest"].to_numpy(int)


def test_matches_sksurv_on_rossi():
    risk, t, e = _rossi()
    train, test = np.arange(0, len(t), 2), np.arange(1, len(t), 2)
    times = np.percentile(t[test][e[test] == 1], [10, 30, 50, 70, 90])
    s = breslow_survival(risk[train], t[train], e[train], risk[test], times)
    y_train, y_test = Surv.from_arrays(e[train].astype(bool), t[train]), Surv.from_arrays(e[test].astype(bool), t[test])
    ref_t, ref = sksurv_metrics.brier_score(y_train, y_test, s, times)
    got_t, got = brier_score(s, t[test], e[test], times, train_time=t[train], train_event=e[train])
    np.testing.assert_allclose(got_t, ref_t)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    ref_ibs = sksurv_metrics.integrated_brier_score(y_train, y_test, s, times)
    got_ibs = integrated_brier_score(s, t[test], e[test], times, train_time=t[train], train_event=e[train])
    assert got_ibs == pytest.approx(ref_ibs, rel=1e-10)


def test_unsorted_times_single_time_and_errors():
    risk, t, e = _rossi()
    times = np.array([40.0, 10.0, 25.0])
    s = breslow_survival(risk, t, e, risk, times)
    got_t, got = brier_score(s, t, e, times)
    ref_t, ref = brier_score(s[:, [1, 2, 0]], t, e, np.sort(times))
    np.testing.assert_allclose(got, ref)
    assert brier_score(s[:, 0], t, e, [40.0])[1].shape == (1,)
    with pytest.raises(ValueError, match="within the follow-up"):
        brier_score(s[:, 0], t, e, [1000.0])
    with pytest.raises(ValueError, match="survival must be"):
        brier_score(s, t, e, [40.0])
    with pytest.raises(ValueError, match="at least two"):
        integrated_brier_score(s[:, :1], t, e, [40.0])


def test_breslow_matches_lifelines_baseline():
    from lifelines import CoxPHFitter
    from lifelines.datasets import load_rossi

    df = load_rossi()[["week", "arrest", "fin", "age", "prio"]]
    cph = CoxPHFitter().fit(df, "week", "arrest")
    risk = (df[["fin", "age", "prio"]] - cph._norm_mean).to_numpy() @ cph.params_.to_numpy()
    times = np.array([10.0, 30.0, 50.0])
    ours = breslow_survival(risk, df["week"].to_numpy(), df["arrest"].to_numpy(), risk[:5], times)
    ref = cph.predict_survival_function(df.iloc[:5], times=times).to_numpy().T
    np.testing.assert_allclose(ours, ref, rtol=1e-3)
