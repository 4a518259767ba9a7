"""Breslow baseline hazard: Cox risks -> survival probabilities at chosen horizons.

For log-hazards ``eta`` fitted by a Cox model, the Breslow estimator of the baseline cumulative
hazard at the distinct event times t is

    H0(t) = sum_{event times s <= t} d_s / sum_{j: time_j >= s} exp(eta_j)

(d_s = number of events at s), and a patient's survival is ``S(t | eta) = exp(-H0(t) exp(eta))``.
This is lifelines' ``CoxPHFitter.baseline_cumulative_hazard_`` when ``eta`` are its centred
partial hazards (tests/models/test_cmml_survival.py checks that on ``load_rossi`` and ``load_lung``).

:class:`BreslowBaseline` holds one estimate per endpoint as an ``nn.Module`` whose
*extra state* is a tensor, so it travels inside ``state_dict`` and therefore inside every
checkpoint written by :func:`lungcore.models.save_model` (``weights_only`` loading still works).

Example:
    >>> import torch
    >>> from lungcore.models.survival import breslow_baseline, survival_at
    >>> times, cumhaz = breslow_baseline(torch.zeros(4), torch.tensor([1., 2., 2., 3.]), torch.tensor([1, 1, 0, 1]))
    >>> [round(float(h), 3) for h in cumhaz]
    [0.25, 0.583, 1.583]
    >>> survival_at(torch.zeros(1), times, cumhaz, [2.5]).shape
    torch.Size([1, 1])
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lungcore import checks

__all__ = ["breslow_baseline", "survival_at", "BreslowBaseline"]


def breslow_baseline(risk: Tensor, time: Tensor, event: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(event_times (K,), cumulative_hazard (K,)) of the Breslow estimator, float64, CPU.

    Args:
        risk: (n,) log-hazards (the model's output on the training split).
        time: (n,) follow-up times >= 0.
        event: (n,) 1 = event, 0 = censored.
        mask: optional (n,) bool; False rows are left out (endpoint absent).
    """
    risk = torch.as_tensor(risk).detach().reshape(-1).double().cpu()
    time = torch.as_tensor(time).detach().reshape(-1).double().cpu()
    event = torch.as_tensor(event).detach().reshape(-1).cpu()
    checks.same_length(risk=risk, time=time, event=event)
    if mask is not None:
        mask = torch.as_tensor(mask).detach().reshape(-1).cpu().bool()
        checks.same_length(risk=risk, mask=mask)
        risk, time, event = risk[mask], time[mask], event[mask]
    if not bool(torch.isfinite(risk).all()):
        raise ValueError("risk must be finite")
    if not bool((torch.isfinite(time) & (time >= 0)).all()):
        raise ValueError("time must be finite and >= 0")
    if not bool(((event == 0) | (event == 1)).all()):
        raise ValueError("event must hold 0/1 values")
    event = event.double()
    if risk.numel() == 0 or event.sum() == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    shift = risk.max()
    w = torch.exp(risk - shift)
    uniq, inv = torch.unique(time, sorted=True, return_inverse=True)
    w_at = torch.zeros_like(uniq).index_add_(0, inv, w)
    d_at = torch.zeros_like(uniq).index_add_(0, inv, event)
    at_risk = w_at.flip(0).cumsum(0).flip(0)  # sum over time_j >= t
    keep = d_at > 0
    hazard = d_at[keep] / at_risk[keep] * torch.exp(-shift)
    return uniq[keep], hazard.cumsum(0)


def survival_at(risk: Tensor, event_times: Tensor, cumulative_hazard: Tensor,
                horizons: Sequence[float] | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(n, len(horizons)) survival probabilities ``exp(-H0(h) exp(risk))`` (H0 a right-continuous step).

    Computed in float64 and returned as ``dtype`` on ``risk``'s device.
    """
    risk = torch.as_tensor(risk).detach().reshape(-1)
    h = torch.as_tensor(horizons, dtype=torch.float64).reshape(-1)
    idx = torch.searchsorted(event_times.double(), h, right=True)  # number of event times <= h
    padded = torch.cat([cumulative_hazard.new_zeros(1), cumulative_hazard.double()])
    h0 = padded[idx]  # (H,)
    return torch.exp(-h0[None, :] * torch.exp(risk.double().cpu())[:, None]).to(dtype).to(risk.device)


class BreslowBaseline(nn.Module):
    """Baseline cumulative hazards of several endpoints, saved inside the module's state_dict.

    Example:
        >>> import torch
        >>> b = BreslowBaseline(("pfs", "os"))
        >>> b.fit("os", torch.zeros(3), torch.tensor([1., 2., 3.]), torch.tensor([1, 0, 1]))
        >>> b.survival("os", torch.zeros(2), [1.5, 10.0]).shape
        torch.Size([2, 2])
    """

    def __init__(self, endpoints: Sequence[str] = ("pfs", "os")) -> None:
        super().__init__()
        self.endpoints = tuple(endpoints)
        self.curves: dict[str, tuple[Tensor, Tensor]] = {}

    def fit(self, endpoint: str, risk: Tensor, time: Tensor, event: Tensor, mask: Tensor | None = None) -> None:
        checks.one_of("endpoint", endpoint, self.endpoints)
        self.curves[endpoint] = breslow_baseline(risk, time, event, mask)

    @property
    def fitted(self) -> bool:
        return len(self.curves) > 0

    def survival(self, endpoint: str, risk: Tensor, horizons: Sequence[float] | Tensor) -> Tensor:
        checks.one_of("endpoint", endpoint, self.endpoints)
        if endpoint not in self.curves:
            raise RuntimeError(f"no baseline hazard fitted for {endpoint!r}: call fit_baseline on the training split first")
        times, cumhaz = self.curves[endpoint]
        return survival_at(risk, times, cumhaz, horizons)

    # extra state as one float64 tensor (rows: endpoint index, time, cumulative hazard)
    def get_extra_state(self) -> Tensor:
        rows = [torch.stack([torch.full_like(t, float(self.endpoints.index(e))), t, h], dim=1)
                for e, (t, h) in self.curves.items()]
        return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)

    def set_extra_state(self, state: Tensor) -> None:
        state = torch.as_tensor(state, dtype=torch.float64).reshape(-1, 3)
        self.curves = {}
        for i, e in enumerate(self.endpoints):
            rows = state[state[:, 0] == i]
            if rows.numel():
                self.curves[e] = (rows[:, 1].clone(), rows[:, 2].clone())
