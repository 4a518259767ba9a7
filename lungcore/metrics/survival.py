"""Survival curves and time-dependent metrics: Kaplan-Meier, the censoring distribution and its
IPCW weights, the cumulative/dynamic AUC, the (integrated) Brier score.

Example:
    >>> kaplan_meier([1.0, 2.0, 2.0, 3.0], [1, 1, 0, 1])[0].tolist()
    [1.0, 2.0, 3.0]
"""
from __future__ import annotations

import numpy as np

from lungcore import checks
from lungcore.checks import ArrayLike


def kaplan_meier(time: ArrayLike, event: ArrayLike, *, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate: (unique times, survival probability just after each time).

    With ``reverse=True`` it estimates the censoring distribution G(t) = P(C > t): censorings are
    the "events" and the subjects with an event at t are no longer at risk of censoring at t.

    Example:
        >>> kaplan_meier([1.0, 2.0, 2.0, 3.0], [1, 1, 0, 1])[1].round(3).tolist()
        [0.75, 0.5, 0.0]
    """
    t = checks.nonnegative("time", checks.finite("time", checks.host_1d("time", time)))
    e = checks.binary("event", event)
    checks.same_length(time=t, event=e)
    if t.size == 0:
        raise ValueError("time is empty: cannot estimate a survival function")
    uniq, inverse = np.unique(t, return_inverse=True)
    n_total = np.bincount(inverse, minlength=uniq.size)
    n_event = np.bincount(inverse, weights=e.astype(float), minlength=uniq.size)
    at_risk = t.size - np.concatenate(([0], np.cumsum(n_total)[:-1]))
    if reverse:
        at_risk = at_risk - n_event
        n_event = n_total - n_event
    ratio = np.divide(n_event, at_risk, out=np.zeros(uniq.size), where=n_event != 0)
    return uniq, np.cumprod(1.0 - ratio)


def _step(uniq: np.ndarray, prob: np.ndarray, at: np.ndarray, what: str) -> np.ndarray:
    """Right-continuous step function (prob[k] on [uniq[k], uniq[k+1])), 1 before the first time."""
    if prob[-1] > 0 and (at > uniq[-1]).any():
        raise ValueError(f"{what}: time {at.max()} lies beyond the largest training time {uniq[-1]} "
                         "where the estimate is undefined")
    idx = np.searchsorted(uniq, at, side="right") - 1
    out = np.where(idx >= 0, prob[np.clip(idx, 0, None)], 1.0)
    out[at > uniq[-1]] = 0.0
    return out


def censoring_survival(train_time: ArrayLike, train_event: ArrayLike, at: ArrayLike) -> np.ndarray:
    """G(t) = P(censoring > t), the reverse Kaplan-Meier of the training data, at times ``at``.

    Example:
        >>> censoring_survival([1.0, 2.0, 3.0], [1, 0, 1], [2.5]).tolist()
        [0.5]
    """
    e = checks.binary("train_event", train_event)
    at = checks.host_1d("at", at)
    if e.all():
        return np.ones_like(at)
    uniq, prob = kaplan_meier(train_time, e, reverse=True)
    return _step(uniq, prob, at, "censoring_survival")


def _ipcw(time: np.ndarray, event: np.ndarray, train_time: ArrayLike | None,
          train_event: ArrayLike | None) -> np.ndarray:
    """1 / G(t_i) for events (0 for censored), G fitted on the training data."""
    if (train_time is None) != (train_event is None):
        raise ValueError("give both train_time and train_event, or neither (then the test data is used)")
    if train_time is None:
        train_time, train_event = time, event
    g = censoring_survival(train_time, train_event, time[event])
    if (g == 0).any():
        raise ValueError("the censoring survival G(t) is 0 at an event time of the test data: "
                         "IPCW weights are undefined (use tau to truncate before the last follow-up)")
    weights = np.zeros(time.size)
    weights[event] = 1.0 / g
    return weights


def cumulative_dynamic_auc(risk: ArrayLike, time: ArrayLike, event: ArrayLike, times: ArrayLike, *,
                           train_time: ArrayLike | None = None, train_event: ArrayLike | None = None,
                           tied_tol: float = 0.0) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic time-dependent AUC at each of ``times`` and its weighted mean.

    At time tau, cases are subjects with an event at or before tau (weighted 1 / G(t_i), G the
    censoring survival of the training data), controls are subjects still event-free after tau;
    AUC(tau) = P(risk_case > risk_control), ties (within ``tied_tol``) counting one half. ``risk`` is (n,) or
    (n, len(times)) (a time-dependent risk: column k scores ``times[k]``, and follows it when the
    times are sorted; then no time may repeat). ``times`` are sorted and de-duplicated and must lie
    in [min(time), max(time)). The mean is the integral of AUC over the Kaplan-Meier estimate of
    the test data, as scikit-survival's ``cumulative_dynamic_auc`` computes it.

    Returns:
        (auc per sorted unique time, mean AUC)

    Example:
        >>> auc, mean = cumulative_dynamic_auc([3.0, 2.0, 1.0, 0.5], [1.0, 2.0, 3.0, 4.0], [1, 1, 1, 0], [1.5, 2.5])
        >>> auc.tolist(), mean
        ([1.0, 1.0], 1.0)
    """
    t = checks.nonnegative("time", checks.finite("time", checks.host_1d("time", time)))
    e = checks.binary("event", event)
    given = checks.finite("times", checks.host_1d("times", np.atleast_1d(
        times.detach().cpu().numpy() if hasattr(times, "detach") else times)))
    tau = np.unique(given)
    if tau.size == 0:
        raise ValueError("times is empty")
    if tau.max() >= t.max() or tau.min() < t.min():
        raise ValueError(f"times must lie within the follow-up of the test data: [{t.min()}, {t.max()})")
    if hasattr(risk, "detach"):
        risk = risk.detach().cpu().numpy()
    risk_arr = np.asarray(risk, dtype=np.float64)
    if risk_arr.ndim == 1:
        risk_arr = np.broadcast_to(risk_arr[:, None], (risk_arr.size, tau.size))
    elif risk_arr.ndim != 2 or risk_arr.shape[1] != given.size:
        raise ValueError(f"risk must be (n,) or (n, {given.size}), one column per entry of times; got {risk_arr.shape}")
    elif tau.size != given.size:
        raise ValueError("times repeats a value; with a risk per time (n, len(times)) give each time once")
    else:  # column k scores times[k]: the columns follow the times into sorted order
        risk_arr = risk_arr[:, np.argsort(given, kind="stable")]
    checks.same_length(risk=risk_arr, time=t, event=e)
    checks.finite("risk", risk_arr.ravel())
    w = _ipcw(t, e, train_time, train_event)

    auc = np.empty(tau.size)
    for k, tk in enumerate(tau):
        r = risk_arr[:, k]
        cases = e & (t <= tk)
        controls = np.sort(r[t > tk])
        if not cases.any():
            raise ValueError(f"times[{k}] = {tk}: no event at or before it, AUC undefined")
        less = np.searchsorted(controls, r[cases] - tied_tol, side="left")
        tie = np.searchsorted(controls, r[cases] + tied_tol, side="right") - less
        wc = w[cases]
        auc[k] = float(np.sum(wc * (less + 0.5 * tie)) / (wc.sum() * controls.size))
    if tau.size == 1:
        return auc, float(auc[0])
    uniq, prob = kaplan_meier(t, e)
    s = _step(uniq, prob, tau, "cumulative_dynamic_auc")
    d = -np.diff(np.concatenate(([1.0], s)))
    return auc, float((auc * d).sum() / (1.0 - s[-1]))


def brier_score(survival: ArrayLike, time: ArrayLike, event: ArrayLike, times: ArrayLike, *,
                train_time: ArrayLike | None = None, train_event: ArrayLike | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """IPCW Brier score of predicted survival probabilities at each of ``times`` (Graf et al. 1999).

    BS(t) = mean_i [ 1(t_i <= t, event_i) S_i(t)^2 / G(t_i) + 1(t_i > t) (1 - S_i(t))^2 / G(t) ],
    G the censoring survival (reverse Kaplan-Meier) of the training data (the test data when
    omitted). ``survival`` is (n,) for one time or (n, len(times)) with P(T_i > times[k]).
    Equals ``sksurv.metrics.brier_score(train, test, survival, times)``.

    Returns:
        (sorted times, Brier score per time)

    Example:
        >>> t, bs = brier_score([[0.9], [0.2], [0.6]], [1.0, 2.0, 3.0], [1, 1, 0], [1.5])
        >>> [round(float(x), 3) for x in bs]
        [0.537]
    """
    t = checks.nonnegative("time", checks.finite("time", checks.host_1d("time", time)))
    e = checks.binary("event", event)
    tau = checks.finite("times", checks.host_1d("times", np.atleast_1d(
        times.detach().cpu().numpy() if hasattr(times, "detach") else times)))
    if tau.size == 0:
        raise ValueError("times is empty")
    order = np.argsort(tau, kind="stable")
    if hasattr(survival, "detach"):
        survival = survival.detach().cpu().numpy()
    s = np.asarray(survival, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[1] != tau.size:
        raise ValueError(f"survival must be (n,) or (n, {tau.size}) for {tau.size} times; got {np.shape(survival)}")
    checks.same_length(survival=s, time=t, event=e)
    checks.finite("survival", s.ravel())
    if tau.max() >= t.max() or tau.min() < t.min():
        raise ValueError(f"times must lie within the follow-up of the test data: [{t.min()}, {t.max()})")
    tau, s = tau[order], s[:, order]
    if (train_time is None) != (train_event is None):
        raise ValueError("give both train_time and train_event, or neither (then the test data is used)")
    if train_time is None:
        train_time, train_event = t, e
    # 1 / G(t_i) for events and 1 / G(t); G = 0 (beyond the last censoring) gives weight 0, as in sksurv
    g_event = censoring_survival(train_time, train_event, t[e])
    w_event = np.zeros(t.size)
    w_event[e] = np.divide(1.0, g_event, out=np.zeros_like(g_event), where=g_event > 0)
    g_tau = censoring_survival(train_time, train_event, tau)
    scores = np.empty(tau.size)
    for k, tk in enumerate(tau):
        died = (t <= tk) & e
        alive = t > tk
        scores[k] = np.mean(np.where(died, s[:, k] ** 2 * w_event, 0.0)
                            + np.where(alive, (1.0 - s[:, k]) ** 2 / g_tau[k] if g_tau[k] > 0 else 0.0, 0.0))
    return tau, scores


def integrated_brier_score(survival: ArrayLike, time: ArrayLike, event: ArrayLike, times: ArrayLike, *,
                           train_time: ArrayLike | None = None, train_event: ArrayLike | None = None) -> float:
    """Brier score integrated over ``times`` (trapezoid rule) divided by the time span.

    ``times``: at least two, sorted; ``survival`` (n, len(times)). Equals
    ``sksurv.metrics.integrated_brier_score``. 0 is perfect; 0.25 is the uninformative S = 0.5.

    Example:
        >>> s = [[0.9, 0.8], [0.3, 0.1], [0.8, 0.6], [0.9, 0.9]]
        >>> round(integrated_brier_score(s, [1.0, 2.0, 3.0, 4.0], [1, 1, 0, 0], [1.5, 2.5]), 4)
        0.2713
    """
    tau = checks.host_1d("times", np.atleast_1d(times.detach().cpu().numpy() if hasattr(times, "detach") else times))
    if tau.size < 2:
        raise ValueError("times needs at least two values to integrate over")
    tau_sorted, scores = brier_score(survival, time, event, tau, train_time=train_time, train_event=train_event)
    if np.unique(tau_sorted).size != tau_sorted.size:
        raise ValueError("times must not repeat a value")
    return float(np.trapezoid(scores, tau_sorted) / (tau_sorted[-1] - tau_sorted[0]))
