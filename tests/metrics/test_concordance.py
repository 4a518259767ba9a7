"""C-index, Uno's C and time-dependent AUC against lifelines and scikit-survival."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcore import backend
from lungcore.metrics import (
    Concordance,
    concordance_index,
    concordance_index_ipcw,
    concordance_index_reference,
    cumulative_dynamic_auc,
    kaplan_meier,
)



def _peer(module: str):
    """A peer library, imported per test: a machine without it skips only the tests that use it."""
    return pytest.importorskip(module)


def _tied_data(rng, n, n_times=15, n_risks=7, p_event=0.6):
    time = rng.integers(0, n_times, n).astype(float)
    event = rng.random(n) < p_event
    risk = rng.integers(0, n_risks, n).astype(float)
    return risk, time, event


def _structured(event, time):
    return np.array(list(zip(event.astype(bool), time.astype(float))), dtype=[("event", bool), ("time", float)])


def _lifelines_cases():
    rossi = _peer("lifelines.datasets").load_rossi()
    lung = _peer("lifelines.datasets").load_lung().dropna(subset=["ph.ecog", "age"])
    # real cohorts, with real covariates as the (deliberately tie-heavy) risk scores
    yield "rossi-prio", rossi["prio"].to_numpy(float), rossi["week"].to_numpy(float), rossi["arrest"].to_numpy()
    yield "rossi-age", -rossi["age"].to_numpy(float), rossi["week"].to_numpy(float), rossi["arrest"].to_numpy()
    yield "lung-ecog", lung["ph.ecog"].to_numpy(float), lung["time"].to_numpy(float), lung["status"].to_numpy()
    yield "lung-age", lung["age"].to_numpy(float), lung["time"].to_numpy(float), lung["status"].to_numpy()


@pytest.mark.parametrize("name,risk,time,event", list(_lifelines_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_real_cohorts_match_lifelines_and_sksurv(name, risk, time, event):
    concordance_index_censored = _peer("sksurv.metrics").concordance_index_censored

    c = concordance_index(risk, time, event, return_counts=True)
    assert abs(c.cindex - _peer("lifelines.utils").concordance_index(time, -risk, event)) < 1e-12
    sk = concordance_index_censored(event.astype(bool), time, risk)
    assert abs(c.cindex - sk[0]) < 1e-12
    assert (c.concordant, c.discordant, c.tied_risk, c.tied_time) == tuple(int(x) for x in sk[1:])


@pytest.mark.parametrize("n", [2, 3, 11, 64, 257, 1500])
def test_random_ties_match_peers_and_reference(rng, n):
    concordance_index_censored = _peer("sksurv.metrics").concordance_index_censored

    for trial in range(5):
        risk, time, event = _tied_data(rng, n, n_times=max(2, n // 4), n_risks=max(2, n // 8))
        event[0] = True  # at least one event
        if time.max() == time.min():
            time[-1] += 1
        try:
            lifelines_value = _peer("lifelines.utils").concordance_index(time, -risk, event)
        except ZeroDivisionError:  # lifelines: "No admissable pairs"
            with pytest.raises(ValueError, match="no comparable pairs"):
                concordance_index(risk, time, event)
            continue
        c = concordance_index(risk, time, event, return_counts=True)
        assert abs(c.cindex - lifelines_value) < 1e-12
        assert c == concordance_index_reference(risk, time, event)
        sk = concordance_index_censored(event, time, risk)
        assert (c.concordant, c.discordant, c.tied_risk, c.tied_time) == tuple(int(x) for x in sk[1:])
        assert c.comparable == c.concordant + c.discordant + c.tied_risk
        assert c.cindex == pytest.approx((c.concordant + 0.5 * c.tied_risk) / c.comparable, abs=1e-15)


def test_cpp_kernel_runs_and_equals_reference_backend(rng):
    risk, time, event = _tied_data(rng, 400)
    with backend.use_backend("cpu"), backend.count_launches() as launches:
        fast = concordance_index(risk, time, event, return_counts=True)
    assert launches["concordance_index.cpu"] == 1
    with backend.use_backend("reference"), backend.count_launches() as launches:
        slow = concordance_index(risk, time, event, return_counts=True)
    assert launches["concordance_index.cpu"] == 0
    assert fast == slow


def test_tie_rules_by_hand():
    # event at 2 vs censored at 2: comparable (event earlier); events both at 3: not compared
    c = concordance_index([1.0, 0.0, 5.0, 5.0], [2.0, 2.0, 3.0, 3.0], [1, 0, 1, 1], return_counts=True)
    assert (c.comparable, c.concordant, c.discordant, c.tied_time) == (3, 1, 2, 1)
    c = concordance_index([1.0, 1.0], [1.0, 2.0], [1, 0], return_counts=True)
    assert c.cindex == 0.5 and c.tied_risk == 1
    c = concordance_index([0.0, 1.0], [1.0, 2.0], [1, 1], return_counts=True)
    assert c.cindex == 0.0 and c.discordant == 1


def test_accepts_numpy_lists_torch_and_keywords(rng):
    risk, time, event = _tied_data(rng, 50)
    expected = concordance_index(risk, time, event)
    assert concordance_index(event=event, time=time, risk=risk) == expected
    assert concordance_index(torch.tensor(risk), torch.tensor(time), torch.tensor(event)) == expected
    assert concordance_index(torch.tensor(risk, dtype=torch.float32, requires_grad=True),
                             torch.tensor(time), torch.tensor(event, dtype=torch.int64)) == \
        concordance_index(risk.astype(np.float32), time, event)
    assert concordance_index(list(risk), list(time), list(event)) == expected
    assert float(concordance_index(risk, time, event, return_counts=True)) == expected


@pytest.mark.cuda
def test_cuda_tensors(rng):
    risk, time, event = _tied_data(rng, 500)
    expected = concordance_index(risk, time, event)
    got = concordance_index(torch.tensor(risk, device="cuda"), torch.tensor(time, device="cuda"),
                            torch.tensor(event, device="cuda"))
    assert got == expected


@pytest.mark.parametrize("kwargs,match", [
    (dict(risk=[1.0, 2.0], time=[1.0, 2.0, 3.0], event=[1, 0, 1]), "same length"),
    (dict(risk=[1.0, np.nan, 2.0], time=[1.0, 2.0, 3.0], event=[1, 0, 1]), r"risk\[1\] is nan"),
    (dict(risk=[1.0, np.inf, 2.0], time=[1.0, 2.0, 3.0], event=[1, 0, 1]), r"risk\[1\] is inf"),
    (dict(risk=[1.0, 0.0, 2.0], time=[1.0, np.nan, 3.0], event=[1, 0, 1]), r"time\[1\] is nan"),
    (dict(risk=[1.0, 0.0, 2.0], time=[1.0, -2.0, 3.0], event=[1, 0, 1]), r"time\[1\] is negative"),
    (dict(risk=[1.0, 0.0, 2.0], time=[1.0, 2.0, 3.0], event=[1, 2, 1]), r"event\[1\] is 2.0"),
    (dict(risk=[1.0, 0.0, 2.0], time=[1.0, 2.0, 3.0], event=[0, 0, 0]), "no comparable pairs"),
    (dict(risk=[1.0], time=[1.0], event=[1]), "no comparable pairs"),
    (dict(risk=[], time=[], event=[]), "no comparable pairs"),
    (dict(risk=[[1.0, 2.0]], time=[1.0], event=[1]), "must be 1-D"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        concordance_index(**kwargs)


def test_bad_input_in_cpp_never_crashes():
    from lungcore import _C

    with pytest.raises(ValueError, match="NaN"):
        _C.concordance_counts(np.array([np.nan, 1.0]), np.array([1.0, 2.0]), np.array([1, 0], np.uint8))
    with pytest.raises(ValueError, match="same length"):
        _C.concordance_counts(np.array([0.0, 1.0]), np.array([1.0]), np.array([1, 0], np.uint8))
    with pytest.raises(ValueError, match="0 or 1"):
        _C.concordance_counts(np.array([0.0, 1.0]), np.array([1.0, 2.0]), np.array([1, 7], np.uint8))


def test_no_pairs_nan_option():
    assert np.isnan(concordance_index([1.0, 2.0], [1.0, 2.0], [0, 0], no_pairs="nan"))
    with pytest.raises(ValueError, match="no_pairs"):
        concordance_index([1.0, 2.0], [1.0, 2.0], [1, 0], no_pairs="zero")


# --- Uno's C and time-dependent AUC --------------------------------------------------------



def _rossi_split():
    rossi = _peer("lifelines.datasets").load_rossi()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(rossi))
    train, test = rossi.iloc[idx[:300]], rossi.iloc[idx[300:]]
    risk = 0.1 * test["prio"].to_numpy(float) - 0.05 * test["age"].to_numpy(float) + 0.3 * test["race"].to_numpy(float)
    return (train["week"].to_numpy(float), train["arrest"].to_numpy(bool),
            test["week"].to_numpy(float), test["arrest"].to_numpy(bool), risk)


@pytest.mark.parametrize("tau", [None, 30.0, 45.0])
def test_uno_matches_sksurv_on_rossi(tau):
    tr_t, tr_e, te_t, te_e, risk = _rossi_split()
    # the last follow-up (week 52) is censored for most: G > 0 only before it, so truncate
    tau_eff = tau if tau is not None else 51.0
    ours = concordance_index_ipcw(risk, te_t, te_e, train_time=tr_t, train_event=tr_e, tau=tau_eff,
                                  return_counts=True, tied_tol=1e-8)
    theirs = _peer("sksurv.metrics").concordance_index_ipcw(_structured(tr_e, tr_t), _structured(te_e, te_t), risk, tau=tau_eff)
    assert abs(ours.cindex - theirs[0]) < 1e-8
    assert (ours.concordant, ours.discordant, ours.tied_risk, ours.tied_time) == tuple(int(x) for x in theirs[1:])


@pytest.mark.parametrize("n", [40, 301])
def test_uno_and_auc_match_sksurv_on_random_data(rng, n):
    for trial in range(3):
        tr_t = rng.integers(0, 30, 2 * n).astype(float)
        tr_e = rng.random(2 * n) < 0.5
        te_t = rng.integers(1, 25, n).astype(float)
        te_e = rng.random(n) < 0.6
        risk = rng.normal(size=n).round(1)
        for tau in (None, 12.0):
            ours = concordance_index_ipcw(risk, te_t, te_e, train_time=tr_t, train_event=tr_e, tau=tau)
            theirs = _peer("sksurv.metrics").concordance_index_ipcw(_structured(tr_e, tr_t), _structured(te_e, te_t), risk, tau=tau)
            assert abs(ours - theirs[0]) < 1e-8
        times = np.array([5.0, 9.5, 14.0, 20.0])
        auc, mean = cumulative_dynamic_auc(risk, te_t, te_e, times, train_time=tr_t, train_event=tr_e)
        sk_auc, sk_mean = _peer("sksurv.metrics").cumulative_dynamic_auc(_structured(tr_e, tr_t), _structured(te_e, te_t), risk, times)
        np.testing.assert_allclose(auc, sk_auc, atol=1e-8, rtol=0)
        assert abs(mean - sk_mean) < 1e-8
        risk2d = rng.normal(size=(n, times.size))
        auc, mean = cumulative_dynamic_auc(risk2d, te_t, te_e, times, train_time=tr_t, train_event=tr_e)
        sk_auc, sk_mean = _peer("sksurv.metrics").cumulative_dynamic_auc(_structured(tr_e, tr_t), _structured(te_e, te_t), risk2d, times)
        np.testing.assert_allclose(auc, sk_auc, atol=1e-8, rtol=0)
        assert abs(mean - sk_mean) < 1e-8


def test_auc_on_rossi_matches_sksurv():
    tr_t, tr_e, te_t, te_e, risk = _rossi_split()
    times = np.array([10.0, 20.0, 30.0, 40.0])
    # G(52) = 0 (everyone still free is censored at the end of the study): IPCW is undefined for
    # the arrests in week 52, so both libraries need them out of the test split
    keep = ~(te_e & (te_t >= 52))
    risk, te_t, te_e = risk[keep], te_t[keep], te_e[keep]
    auc, mean = cumulative_dynamic_auc(risk, te_t, te_e, times, train_time=tr_t, train_event=tr_e, tied_tol=1e-8)
    sk_auc, sk_mean = _peer("sksurv.metrics").cumulative_dynamic_auc(_structured(tr_e, tr_t), _structured(te_e, te_t), risk, times)
    np.testing.assert_allclose(auc, sk_auc, atol=1e-8, rtol=0)
    assert abs(mean - sk_mean) < 1e-8


def test_kaplan_meier_matches_lifelines():
    KaplanMeierFitter = _peer("lifelines").KaplanMeierFitter

    lung = _peer("lifelines.datasets").load_lung()
    t, e = lung["time"].to_numpy(float), lung["status"].to_numpy()
    uniq, prob = kaplan_meier(t, e)
    km = KaplanMeierFitter().fit(t, e)
    expected = km.survival_function_at_times(uniq).to_numpy()
    np.testing.assert_allclose(prob, expected, atol=1e-12)


def test_uno_and_auc_bad_input():
    with pytest.raises(ValueError, match="every test subject is censored"):
        concordance_index_ipcw([1.0, 2.0], [1.0, 2.0], [0, 0])
    with pytest.raises(ValueError, match="train_time and train_event"):
        concordance_index_ipcw([1.0, 2.0], [1.0, 2.0], [1, 0], train_time=[1.0, 2.0])
    with pytest.raises(ValueError, match="within the follow-up"):
        cumulative_dynamic_auc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1, 1, 0], [5.0])
    with pytest.raises(ValueError, match=r"risk must be \(n,\) or"):
        cumulative_dynamic_auc(np.zeros((3, 2)), [1.0, 2.0, 3.0], [1, 1, 0], [1.5])
    with pytest.raises(ValueError, match="times repeats a value"):
        cumulative_dynamic_auc(np.zeros((3, 2)), [1.0, 2.0, 3.0], [1, 1, 0], [1.5, 1.5])


def test_time_dependent_risk_columns_follow_their_times():
    """Column k of a (n, len(times)) risk scores times[k], in whatever order the times are given
    (the AUCs come back at the sorted times), as brier_score pairs them."""
    time, event = np.array([1.0, 2, 3, 4, 5, 6]), np.array([1, 1, 0, 1, 1, 1])
    risk = np.array([[.1, .9], [.2, .8], [.3, .7], [.4, .6], [.5, .5], [.6, .4]])  # scores for times 4.0, 2.0
    auc, mean = cumulative_dynamic_auc(risk, time, event, [4.0, 2.0])
    sorted_auc, sorted_mean = cumulative_dynamic_auc(risk[:, ::-1], time, event, [2.0, 4.0])
    np.testing.assert_array_equal(auc, sorted_auc)
    assert mean == sorted_mean
    assert [cumulative_dynamic_auc(risk[:, k], time, event, [t])[0][0] for k, t in ((1, 2.0), (0, 4.0))] == list(auc)


@pytest.mark.parametrize("tol", [0.0, 1e-8, 0.05, 0.5])
def test_tied_tol_cpp_equals_reference_and_sksurv(rng, tol):
    concordance_index_censored = _peer("sksurv.metrics").concordance_index_censored

    risk, time, event = _tied_data(rng, 300)
    risk = risk * 0.1 + rng.normal(scale=1e-9, size=risk.size)   # near-ties within 1e-8
    fast = concordance_index(risk, time, event, tied_tol=tol, return_counts=True)
    slow = concordance_index_reference(risk, time, event, tied_tol=tol)
    assert fast.as_dict() == pytest.approx(slow.as_dict(), abs=1e-12)
    sk = concordance_index_censored(event, time, risk, tied_tol=tol)
    assert abs(fast.cindex - sk[0]) < 1e-12
    assert (fast.concordant, fast.discordant, fast.tied_risk) == tuple(int(x) for x in sk[1:4])
    with pytest.raises(ValueError, match="tied_tol"):
        concordance_index(risk, time, event, tied_tol=-1.0)


def test_large_cohort_cpp_equals_lifelines(rng):
    n = 20_000
    time = np.round(rng.exponential(24.0, n), 1)
    event = rng.random(n) < 0.7
    risk = np.round(rng.normal(size=n), 2)
    c = concordance_index(risk, time, event, return_counts=True)
    assert abs(c.cindex - _peer("lifelines.utils").concordance_index(time, -risk, event)) < 1e-12
    assert c.comparable == c.concordant + c.discordant + c.tied_risk
