"""Harrell's C-index: lungcore (C++, O(n log n)) vs lifelines vs scikit-survival.

lifelines (O(n log n), Python) is the baseline: it is what survival users reach for.
scikit-survival's ``concordance_index_censored`` is O(n^2) in Python, so it only runs on the
small sizes. The check asserts all providers agree to 1e-12 before timing.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from benchmarks.harness import Case
from lungcore.backend import use_backend
from lungcore.metrics import concordance_index

NAME = "concordance"


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    time = np.round(rng.exponential(24.0, n), 1)        # months, one decimal: many tied times
    event = rng.random(n) < 0.7
    risk = np.round(rng.normal(size=n), 3)              # tied risks too
    return risk, time, event


def cases(device: str, quick: bool) -> list[Case]:
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 50_000, 200_000]
    out = []
    have_lifelines = importlib.util.find_spec("lifelines") is not None
    have_sksurv = importlib.util.find_spec("sksurv") is not None
    for n in sizes:
        risk, time, event = _data(n)
        providers = {}

        def lungcore_cpp(risk=risk, time=time, event=event):
            with use_backend("cpu"):
                return concordance_index(risk, time, event)

        providers["lungcore"] = lungcore_cpp
        if have_lifelines:
            from lifelines.utils import concordance_index as lifelines_ci

            providers["lifelines"] = lambda risk=risk, time=time, event=event: lifelines_ci(time, -risk, event)
        if have_sksurv and n <= 10_000:
            from sksurv.metrics import concordance_index_censored

            providers["scikit-survival"] = (
                lambda risk=risk, time=time, event=event: concordance_index_censored(event, time, risk)[0])

        def check(providers=providers):
            values = {name: float(fn()) for name, fn in providers.items()}
            ref = values["lungcore"]
            bad = {k: v for k, v in values.items() if abs(v - ref) > 1e-12}
            if bad:
                raise AssertionError(f"C-index providers disagree: {values}")

        out.append(Case(shape=f"n={n:,}", size=n, providers=providers,
                        baseline="lifelines" if have_lifelines else "lungcore", check=check))
    return out
