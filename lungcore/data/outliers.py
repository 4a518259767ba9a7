"""How far out a numeric value lies from its cohort, in standard deviations: one wording for
``lungcore validate``'s warning and for the rows train, predict and evaluate name when a model's
output is not finite (no torch here: ``validate`` starts without it).

``validate`` measures a manifest's values against the manifest itself, robustly: the centre is
the median and the scale 1.4826 x the median absolute deviation (MAD; the SD of normal data),
since a value of 1e25 inflates a mean and an SD computed with it until it lies only about
sqrt(n) of those SDs out. A column where more than half the values are equal (a 0/1 flag, a
mostly-zero dose) has a MAD of 0; its scale is then the MAD of the values that differ from the
median, and a constant column has no scale at all (none of its values is far out).

Example:
    >>> centre, scale = robust_centre_scale([60, 61, 65, 70, 1e25])
    >>> centre, round(scale, 2)
    (65.0, 7.41)
    >>> [(i, sd_text(sd)) for i, sd in far_out([60, 61, 65, 70, 1e25])]   # (position, standard deviations)
    [(4, '1.35e+24')]
    >>> sd_text(float("inf"))
    'infinitely many'
    >>> far_out([0, 0, 0, 1]), far_out([7, 7, 7])  # a rare 0/1 flag, a constant column: nothing far out
    ([], [])
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAD_TO_SD = 1.4826  # 1 / Phi^-1(3/4): the MAD of normal data times this is their SD
FAR_OUT_SD = 1e3    # robust SDs from the median beyond which validate warns


def sd_text(sd: float) -> str:
    """How many standard deviations a value lies from its cohort's centre, as the messages say it:
    ``1.14e+24``, or ``infinitely many`` when ``sd`` is not finite."""
    return "infinitely many" if not math.isfinite(sd) else f"{sd:.3g}"


def robust_centre_scale(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(median, robust SD)`` of the finite ``values``: 1.4826 x their MAD, or where that is 0 (more
    than half the values equal) 1.4826 x the MAD of the values off the median; 0 for a constant
    column, NaN and 0 for no finite value."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, 0.0
    centre = float(np.median(x))
    deviation = np.abs(x - centre)
    mad = float(np.median(deviation))
    if mad == 0.0:
        off = deviation[deviation > 0]
        mad = float(np.median(off)) if off.size else 0.0
    return centre, MAD_TO_SD * mad


def far_out(values: Sequence[float] | np.ndarray, limit: float = FAR_OUT_SD,
            centre_scale: tuple[float, float] | None = None) -> list[tuple[int, float]]:
    """``(position, standard deviations)`` of each finite value more than ``limit`` robust SDs
    (:func:`robust_centre_scale`, or ``centre_scale`` when the caller has it already) from the
    median of ``values``, in order; none when the scale is 0."""
    x = np.asarray(values, dtype=np.float64)
    centre, scale = robust_centre_scale(x) if centre_scale is None else centre_scale
    if not scale > 0:
        return []
    with np.errstate(over="ignore"):
        sd = np.abs(x - centre) / scale
    return [(int(i), float(sd[i])) for i in np.flatnonzero(np.isfinite(x) & (sd > limit))]
