"""Breslow baseline hazard (lungcore.models.survival) vs lifelines' CoxPHFitter with fixed risks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcore.models.survival import BreslowBaseline, breslow_baseline, survival_at

lifelines = pytest.importorskip("lifelines")


def _fitted(name: str):
    from lifelines import CoxPHFitter
    from lifelines.datasets import load_lung, load_rossi

    if name == "rossi":
        df, duration, event = load_rossi(), "week", "arrest"
    else:
        df, duration, event = load_lung().dropna().drop(columns=["inst"]), "time", "status"
    cph = CoxPHFitter().fit(df, duration, event)
    risk = np.asarray(cph.predict_log_partial_hazard(df), dtype=np.float64)  # centred covariates, as lifelines
    return cph, df, risk, df[duration].to_numpy(np.float64), df[event].to_numpy(np.int64)


@pytest.mark.parametrize("name", ["rossi", "lung"])
def test_breslow_matches_lifelines_baseline(name):
    cph, df, risk, time, event = _fitted(name)
    times, cumhaz = breslow_baseline(torch.from_numpy(risk), torch.from_numpy(time), torch.from_numpy(event))
    ref = cph.baseline_cumulative_hazard_.iloc[:, 0]
    at = torch.tensor(ref.index.to_numpy(np.float64))
    ours = torch.cat([cumhaz.new_zeros(1), cumhaz])[torch.searchsorted(times, at, right=True)]
    np.testing.assert_allclose(ours.numpy(), ref.to_numpy(), rtol=1e-7, atol=1e-10)
    # survival curves of every subject at a few observed times (lifelines interpolates linearly
    # between its grid points; a Breslow curve is a step function, so compare on the grid)
    grid = ref.index.to_numpy(np.float64)
    horizons = grid[[len(grid) // 10, len(grid) // 2, 9 * len(grid) // 10]]
    ref_s = cph.predict_survival_function(df, times=horizons).to_numpy().T  # (n, H)
    ours_s = survival_at(torch.from_numpy(risk), times, cumhaz, horizons).double().numpy()
    np.testing.assert_allclose(ours_s, ref_s, rtol=2e-6, atol=1e-7)


def test_breslow_shift_invariant_and_masked():
    _, _, risk, time, event = _fitted("rossi")
    r = torch.from_numpy(risk)
    t0, h0 = breslow_baseline(r, torch.from_numpy(time), torch.from_numpy(event))
    t1, h1 = breslow_baseline(r + 500.0, torch.from_numpy(time), torch.from_numpy(event))
    torch.testing.assert_close(t0, t1)
    torch.testing.assert_close(h1 * np.exp(500.0), h0, rtol=1e-9, atol=0)
    # mask == dropping the rows; masked rows may hold anything
    mask = torch.arange(len(risk)) % 3 != 0
    tm, hm = breslow_baseline(r, torch.from_numpy(time), torch.from_numpy(event), mask)
    t2, h2 = breslow_baseline(r[mask], torch.from_numpy(time)[mask], torch.from_numpy(event)[mask])
    torch.testing.assert_close(tm, t2)
    torch.testing.assert_close(hm, h2)


def test_breslow_edge_cases():
    t, h = breslow_baseline(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))
    assert t.numel() == 0 and h.numel() == 0
    assert survival_at(torch.zeros(2), t, h, [1.0, 5.0]).eq(1).all()
    with pytest.raises(ValueError, match="time"):
        breslow_baseline(torch.zeros(2), torch.tensor([1.0, -1.0]), torch.ones(2))
    with pytest.raises(ValueError, match="event"):
        breslow_baseline(torch.zeros(2), torch.tensor([1.0, 1.0]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="risk"):
        breslow_baseline(torch.tensor([0.0, float("nan")]), torch.tensor([1.0, 1.0]), torch.ones(2))


def test_baseline_module_state_roundtrip():
    b = BreslowBaseline(("pfs", "os"))
    assert not b.fitted
    b.fit("os", torch.randn(10), torch.rand(10) * 5, torch.ones(10))
    state = b.state_dict()
    c = BreslowBaseline(("pfs", "os"))
    c.load_state_dict(state)
    assert set(c.curves) == {"os"}
    torch.testing.assert_close(c.survival("os", torch.zeros(3), [1.0, 2.0]), b.survival("os", torch.zeros(3), [1.0, 2.0]))
    with pytest.raises(RuntimeError, match="fit_baseline"):
        c.survival("pfs", torch.zeros(1), [1.0])
