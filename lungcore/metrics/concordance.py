"""Harrell's and Uno's C-index: the pair counts in the C++ core (O(n log n), a Fenwick tree over
risk ranks) or the O(n^2) oracle beside it, behind the ``concordance_index`` backend op.

Tie rules (identical to lifelines' ``concordance_index`` and scikit-survival's
``concordance_index_censored``): a pair is comparable when the earlier time is an event; an
event and a censoring at the same time are comparable (the event counts as earlier); two events
at the same time are not compared; tied risks (exact equality) count one half.

Example:
    >>> concordance_index(risk=[3.0, 2.0, 1.0], time=[1.0, 2.0, 3.0], event=[1, 1, 0])
    1.0
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from lungcore import backend, checks
from lungcore.checks import ArrayLike
from lungcore.metrics.survival import _ipcw

backend.register_op("concordance_index", ("cpu",),
                    preference={"cpu": ("cpu", "reference"), "cuda": ("cpu", "reference")})


@dataclass(frozen=True)
class Concordance:
    """A C-index with the pair counts behind it (for confidence intervals or pooling).

    ``cindex = (concordant + tied_risk / 2) / comparable`` for Harrell's C (weighted for Uno's);
    ``tied_time`` counts the comparable (event, censored-at-the-same-time) pairs, as
    scikit-survival does.

    Example:
        >>> c = concordance_index([0.9, 0.1, 0.5, 0.5], [2.0, 5.0, 3.0, 4.0], [1, 0, 1, 1], return_counts=True)
        >>> c
        Concordance(cindex=0.916..., concordant=5, discordant=0, tied_risk=1, tied_time=0, comparable=6)
        >>> (c.concordant + c.tied_risk / 2) / c.comparable == float(c)
        True
    """

    cindex: float
    concordant: int
    discordant: int
    tied_risk: int
    tied_time: int
    comparable: int

    def __float__(self) -> float:
        return self.cindex

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a dict (what ``lungcore cindex`` prints as JSON)."""
        return asdict(self)


NoPairs = Literal["raise", "nan"]


def _finish(numerator: float, denominator: float, counts: dict, no_pairs: NoPairs) -> Concordance:
    if counts["comparable"] == 0 or denominator == 0:
        if no_pairs == "raise":
            raise ValueError(
                "no comparable pairs: the C-index is undefined (every subject censored, or all events "
                "at one time with nothing later); pass no_pairs='nan' to get NaN instead"
            )
        cindex = math.nan
    else:
        cindex = numerator / denominator
    return Concordance(cindex=float(cindex), concordant=int(counts["concordant"]),
                       discordant=int(counts["discordant"]), tied_risk=int(counts["tied_risk"]),
                       tied_time=int(counts["tied_time"]), comparable=int(counts["comparable"]))


def _counts_reference(risk: np.ndarray, time: np.ndarray, event: np.ndarray,
                      weight: np.ndarray | None = None, tied_tol: float = 0.0) -> dict:
    """O(n^2) counting, one vectorised row per event: the oracle for the C++ core."""
    out = dict(numerator=0.0, denominator=0.0, concordant=0, discordant=0, tied_risk=0,
               tied_time=0, comparable=0)
    for i in np.flatnonzero(event):
        later = (time > time[i]) | ((time == time[i]) & ~event)
        r = risk[later]
        tied = np.abs(r - risk[i]) <= tied_tol
        less = int((r[~tied] < risk[i]).sum())
        tie = int(tied.sum())
        size = int(later.sum())
        w = 1.0 if weight is None else float(weight[i])
        out["concordant"] += less
        out["tied_risk"] += tie
        out["discordant"] += size - less - tie
        out["comparable"] += size
        out["tied_time"] += int(((time == time[i]) & ~event).sum())
        out["numerator"] += w * (less + 0.5 * tie)
        out["denominator"] += w * size
    return out


def _counts(risk: np.ndarray, time: np.ndarray, event: np.ndarray, weight: np.ndarray | None,
            device: object, tied_tol: float) -> dict:
    if not (np.isfinite(tied_tol) and tied_tol >= 0):
        raise ValueError(f"tied_tol must be finite and >= 0, got {tied_tol}")
    choice = backend.backend_for("concordance_index", device)
    if choice == "cpu":
        from lungcore import _C

        backend.record_launch("concordance_index.cpu")
        return _C.concordance_counts(risk, time, event.astype(np.uint8), weight, float(tied_tol))
    return _counts_reference(risk, time, event, weight, tied_tol)


def _device_of(*values: object) -> str:
    for v in values:
        dev = getattr(v, "device", None)
        if dev is not None and "cuda" in str(dev):
            return "cuda"
    return "cpu"


def concordance_index(risk: ArrayLike, time: ArrayLike, event: ArrayLike, *,
                      return_counts: bool = False, no_pairs: NoPairs = "raise",
                      tied_tol: float = 0.0) -> float | Concordance:
    """Harrell's concordance index (C-index) of risk scores against right-censored times.

    Args:
        risk: (n,) risk scores; higher = earlier event.
        time: (n,) follow-up times, finite and >= 0.
        event: (n,) 1/True = event observed, 0/False = censored.
        return_counts: return a :class:`Concordance` with the pair counts instead of a float.
        no_pairs: ``"raise"`` (default) raises ``ValueError`` when no pair is comparable;
            ``"nan"`` returns NaN instead (handy for tiny validation batches).
        tied_tol: risks within this distance count as tied. 0 (default) = exact equality, as
            lifelines; scikit-survival uses 1e-8.

    Returns:
        The C-index in [0, 1] (0.5 = random), or a :class:`Concordance`.

    Equals ``lifelines.utils.concordance_index(time, -risk, event)`` and
    ``sksurv.metrics.concordance_index_censored(event, time, risk)[0]``. O(n log n): 200,000
    subjects take a few tens of milliseconds on one core.

    Example:
        >>> c = concordance_index([0.9, 0.1, 0.5], [2.0, 5.0, 3.0], [1, 0, 1], return_counts=True)
        >>> c.cindex, c.comparable
        (1.0, 3)
    """
    checks.one_of("no_pairs", no_pairs, ("raise", "nan"))
    device = _device_of(risk, time, event)
    r, t, e = checks.survival_arrays(risk, time, event)
    counts = _counts(r, t, e, None, device, tied_tol)
    result = _finish(counts["numerator"], counts["denominator"], counts, no_pairs)
    return result if return_counts else result.cindex


def concordance_index_reference(risk: ArrayLike, time: ArrayLike, event: ArrayLike, *,
                                tied_tol: float = 0.0) -> Concordance:
    """Pure-Python O(n^2) Harrell's C with its counts: the oracle for :func:`concordance_index`.

    Example:
        >>> concordance_index_reference([2.0, 1.0], [1.0, 2.0], [1, 1]).cindex
        1.0
    """
    r, t, e = checks.survival_arrays(risk, time, event)
    counts = _counts_reference(r, t, e, tied_tol=tied_tol)
    return _finish(counts["numerator"], counts["denominator"], counts, "raise")


def concordance_index_ipcw(risk: ArrayLike, time: ArrayLike, event: ArrayLike, *,
                           train_time: ArrayLike | None = None, train_event: ArrayLike | None = None,
                           tau: float | None = None, return_counts: bool = False,
                           no_pairs: NoPairs = "raise", tied_tol: float = 0.0) -> float | Concordance:
    """Uno's truncated IPCW C-index: each event i weighs 1 / G(t_i)^2, only t_i < tau counts.

    The censoring distribution G is the reverse Kaplan-Meier of the training split
    (``train_time``/``train_event``; the test data itself when omitted). Equals
    ``sksurv.metrics.concordance_index_ipcw(train, test, risk, tau)`` when ``tied_tol=1e-8``
    (scikit-survival's default; lungcore's default 0 means exact ties, like lifelines). Comparable pairs and counts follow Harrell's rules.

    Example:
        >>> round(concordance_index_ipcw([3.0, 2.0, 1.0, 0.5], [1.0, 2.0, 3.0, 4.0], [1, 0, 1, 0]), 3)
        1.0
    """
    checks.one_of("no_pairs", no_pairs, ("raise", "nan"))
    device = _device_of(risk, time, event)
    r, t, e = checks.survival_arrays(risk, time, event)
    if not e.any():
        raise ValueError("event: every test subject is censored; Uno's C-index is undefined")
    in_window = np.ones(t.size, dtype=bool) if tau is None else t < float(tau)
    weights = np.zeros(t.size)
    weights[in_window] = _ipcw(t[in_window], e[in_window], train_time, train_event)
    counts = _counts(r, t, e, np.square(weights), device, tied_tol)
    result = _finish(counts["numerator"], counts["denominator"], counts, no_pairs)
    return result if return_counts else result.cindex
