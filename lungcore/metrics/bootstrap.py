"""Bootstrap confidence intervals of any metric (patient-grouped resampling when given groups)."""
from __future__ import annotations

from collections.abc import Callable
from typing import SupportsFloat

import numpy as np

from lungcore import checks
from lungcore.checks import ArrayLike


def bootstrap_ci(metric: Callable[..., SupportsFloat], *arrays: ArrayLike, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, groups: ArrayLike | None = None) -> tuple[float, float, float]:
    """(estimate, low, high): percentile bootstrap interval of ``metric(*arrays)``.

    Subjects are resampled with replacement (whole ``groups``, e.g. patient ids, when given, so
    several nodules of one patient move together). Resamples where the metric is undefined
    (raises ``ValueError`` or returns NaN, e.g. a single class) are skipped; if more than half
    are, ``ValueError`` says so.

    Example:
        >>> from lungcore.metrics import roc_auc
        >>> est, lo, hi = bootstrap_ci(roc_auc, [0, 0, 1, 1, 0, 1], [0.1, 0.3, 0.8, 0.7, 0.6, 0.4], n_boot=200)
        >>> lo <= est <= hi
        True
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    data = [np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a) for a in arrays]
    n = checks.same_length(**{f"arrays[{i}]": a for i, a in enumerate(data)})
    estimate = float(metric(*data))
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups)
        checks.same_length(groups=g, **{"arrays[0]": data[0]})
        uniq, inverse = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(uniq.size)]
    values = []
    for _ in range(n_boot):
        if groups is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        try:
            v = float(metric(*(a[idx] for a in data)))
        except ValueError:
            continue
        if np.isfinite(v):
            values.append(v)
    if len(values) < n_boot / 2:
        raise ValueError(f"bootstrap_ci: the metric was undefined on {n_boot - len(values)} of {n_boot} resamples")
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return estimate, float(low), float(high)
