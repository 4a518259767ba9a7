"""Survival losses as nn.Modules (thin wrappers of :mod:`lungcore.ops`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lungcore import checks
from lungcore.ops.cox import Reduction, Ties, cox_ph_loss

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["CoxPHLoss"]


class CoxPHLoss(nn.Module):
    """Negative Cox log partial likelihood (:func:`lungcore.ops.cox_ph_loss`) as a module.

    Args:
        ties: ``"efron"`` (default) or ``"breslow"``.
        reduction: ``"mean"`` (per event, default), ``"sum"`` or ``"none"``.
        distributed: let the risk sets span every rank of ``process_group`` when
            ``torch.distributed`` is initialised (a no-op otherwise).

    ``forward(risk, time, event, weights=None, strata=None, mask=None)``.

    Example:
        >>> import torch
        >>> loss_fn = CoxPHLoss()
        >>> risk = torch.randn(6, 1, requires_grad=True)
        >>> loss = loss_fn(risk, torch.tensor([3., 1, 4, 1, 5, 9]), torch.tensor([1, 0, 1, 1, 0, 1]))
        >>> loss.backward()
    """

    def __init__(self, ties: Ties = "efron", reduction: Reduction = "mean", distributed: bool = False,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.ties = checks.one_of("ties", ties, ("efron", "breslow"))
        self.reduction = checks.one_of("reduction", reduction, ("mean", "sum", "none"))
        self.distributed = bool(distributed)
        self.process_group = process_group

    def forward(self, risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                weights: torch.Tensor | None = None, strata: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of :func:`lungcore.ops.cox_ph_loss` with this module's ties, reduction and
        distribution: ``risk`` (N,) or (N, 1) log-hazards, ``time`` (N,), ``event`` (N,) 0/1 or bool,
        optional per-row ``weights``, ``strata`` codes and ``mask`` (False = row left out). The class
        docstring's example calls it."""
        return cox_ph_loss(risk, time, event, ties=self.ties, reduction=self.reduction, weights=weights,
                           strata=strata, mask=mask, distributed=self.distributed,
                           process_group=self.process_group)

    def extra_repr(self) -> str:
        """The settings shown in ``repr(module)``."""
        return f"ties={self.ties!r}, reduction={self.reduction!r}, distributed={self.distributed}"
