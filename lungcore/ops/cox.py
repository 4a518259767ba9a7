"""Cox proportional-hazards loss: the negative log partial likelihood, exact for tied times.

For subjects with log-hazard ``risk`` (eta), follow-up ``time``, ``event`` (1 = event, 0 =
censored), optional non-negative case ``weights`` (w) and ``strata``, the risk set of time t
(within a stratum) is every subject still followed at t (time >= t). For each distinct event
time t with d events D_t, risk-set sum S_t = sum_{j: t_j >= t} w_j e^eta_j and tied sum
T_t = sum_{i in D_t} w_i e^eta_i, every event i in D_t has the term

    term_i = w_i (L_t - eta_i),   L_t = log S_t                                   (Breslow)
                                  L_t = log S_t + 1/d sum_{l=0}^{d-1} log(1 - l T_t / (d S_t)) (Efron)

``reduction="sum"`` is sum_i term_i = minus the log partial likelihood (what lifelines /
R's ``coxph`` / statsmodels maximise); ``"mean"`` divides by the event weight sum_{events} w_i
(the number of events when unweighted: "mean per event"); ``"none"`` returns every row's own
term (0 for censored or masked rows). A batch (or stratum) without events contributes a finite
0 that stays connected to the autograd graph (its gradient is 0).

Weighted Efron follows R's ``coxph`` and lifelines: d counts the tied events (not their
weights) and every Efron term carries the tied events' mean weight, which is exactly the
per-event form above. Rows with weight 0 are the same as masked rows: they join no risk set and
are not counted in d. ``mask`` (B,) bool removes rows entirely (e.g. patients lacking this
endpoint; their time and event may hold anything, their gradient is 0). Weights are constants
(no gradient flows to them).

Backends (``lungcore.backend``): CUDA tensors run the Triton kernels (``triton_kernels/cox.py``:
sort outside, multi-block segmented scans inside, fused backward); CPU tensors run the C++ core
(``csrc/cpu/cox.cpp``, float64) or the reference. Every path is invariant to adding a constant
to every risk (online log-sum-exp) and stays finite for log-hazards of 1000 and more.

Distributed (``distributed=True`` with ``torch.distributed`` initialised): risk, time, event,
weights, strata and mask are all-gathered (risk with gradient; batches may differ in size), so
every rank computes the loss of the concatenated batch (``"none"`` returns this rank's own rows'
terms, computed with the global risk sets). The gather's backward sums every rank's gradient,
so with "sum"/"mean" (every rank holds the same loss) a rank's own risk receives N x the
single-process gradient and DistributedDataParallel's mean over ranks gives exactly the
single-process parameter gradients on the concatenated batch; with "none" (disjoint terms)
DDP yields the gradient of (global sum) / N, as for any per-rank loss under DDP.

Example:
    >>> import torch
    >>> from lungcore.ops import cox_ph_loss
    >>> risk = torch.tensor([0.5, -0.2, 1.0, 0.0], requires_grad=True)
    >>> time = torch.tensor([5.0, 3.0, 3.0, 8.0])
    >>> event = torch.tensor([1, 1, 0, 1])
    >>> loss = cox_ph_loss(risk, time, event, ties="efron")
    >>> loss.backward()
    >>> round(loss.item(), 4)
    0.8321
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from lungcore import backend, checks
from lungcore.usage import is_integer

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["cox_ph_loss", "cox_ph_loss_reference"]

Ties = Literal["efron", "breslow"]
Reduction = Literal["mean", "sum", "none"]

backend.register_op("cox_ph_loss", ("triton", "cpu"),
                    preference={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")})

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# reference (the oracle: plain differentiable PyTorch, O(n log n), per stratum)

def _stratum_terms(eta: torch.Tensor, time: torch.Tensor, event: torch.Tensor, w: torch.Tensor,
                   efron: bool) -> torch.Tensor:
    n = eta.numel()
    order = torch.sort(time, stable=True).indices
    eta_s, t_s, e_s, w_s = eta[order], time[order], event[order], w[order]
    first = torch.ones(n, dtype=torch.bool, device=eta.device)
    first[1:] = t_s[1:] != t_s[:-1]
    gid = torch.cumsum(first.long(), 0) - 1
    n_groups = int(gid[-1]) + 1
    # log of each tie group's sum of w e^eta (shift by the group max: a constant for autograd)
    shift = torch.full((n_groups,), -torch.inf, dtype=eta.dtype, device=eta.device)
    shift = shift.scatter_reduce(0, gid, eta_s.detach(), "amax").detach()
    group_sum = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add(
        0, gid, w_s * torch.exp(eta_s - shift[gid]))
    log_group = shift + torch.log(group_sum)
    log_s = torch.logcumsumexp(log_group.flip(0), 0).flip(0)        # risk set = this group and later
    log_l = log_s
    if efron:
        ef = e_s.to(eta.dtype)
        rho = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add(
            0, gid, torch.where(e_s, w_s * torch.exp(eta_s - log_s[gid]), 0.0))
        d = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add(0, gid, ef)
        before = torch.cumsum(ef, 0) - ef                               # events before me (all groups)
        starts = torch.nonzero(first).squeeze(1)
        rank = torch.where(e_s, before - before[starts][gid], 0.0)       # events before me in my group
        dd = d.clamp_min(1.0)
        u = torch.where(e_s, torch.log1p(-rank * rho[gid] / dd[gid]), 0.0)
        log_l = log_s + torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add(0, gid, u) / dd
    term = torch.where(e_s, w_s * (log_l[gid] - eta_s), 0.0)
    return torch.zeros(n, dtype=eta.dtype, device=eta.device).index_copy(0, order, term)


def cox_ph_loss_reference(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, *,
                          ties: Ties = "efron", reduction: Reduction = "mean",
                          weights: torch.Tensor | None = None, strata: torch.Tensor | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-PyTorch oracle of :func:`cox_ph_loss` (same arguments, no validation).

    Computes in float64 for float64 risk, else float32; differentiable by autograd.

    Example:
        >>> import torch
        >>> r = torch.tensor([0.5, -0.2, 1.0, 0.0], dtype=torch.float64)
        >>> t = torch.tensor([5.0, 3.0, 3.0, 8.0]); e = torch.tensor([1, 1, 0, 1])
        >>> round(float(cox_ph_loss_reference(r, t, e, reduction="sum")), 4)
        2.4963
    """
    dtype = _acc(risk.dtype)
    eta = risk.reshape(-1).to(dtype)
    n = eta.numel()
    ev = event.reshape(-1) != 0
    w = weights.reshape(-1).to(dtype) if weights is not None else torch.ones(n, dtype=dtype, device=eta.device)
    keep = w > 0
    if mask is not None:
        keep = keep & mask.reshape(-1).bool()
    rows = torch.nonzero(keep).squeeze(1)
    terms_kept = torch.zeros(rows.numel(), dtype=dtype, device=eta.device)
    t_k = time.reshape(-1)[rows]
    e_k, w_k, eta_k = ev[rows], w[rows], eta[rows]
    if rows.numel():  # the loss is shift invariant: centre on the largest risk (exact in fp32)
        eta_k = eta_k - eta_k.detach().max()
    if strata is None:
        groups = [torch.arange(rows.numel(), device=eta.device)] if rows.numel() else []
    else:
        s_k = strata.reshape(-1)[rows]
        groups = [torch.nonzero(s_k == v).squeeze(1) for v in torch.unique(s_k)]
    for sel in groups:
        terms_kept = terms_kept.index_copy(
            0, sel, _stratum_terms(eta_k[sel], t_k[sel], e_k[sel], w_k[sel], ties == "efron"))
    terms = torch.zeros(n, dtype=dtype, device=eta.device).index_copy(0, rows, terms_kept)
    terms = terms + (eta * 0.0)  # keep an event-less batch connected to the graph
    if reduction == "none":
        return terms
    total = terms.sum()
    if reduction == "sum":
        return total
    norm = torch.where(e_k, w_k, 0.0).sum()
    return total / torch.where(norm > 0, norm, torch.ones_like(norm))


# ------------------------------------------------------------------------------------------------
# the registered op (Triton / C++), its fake and its autograd

def _sort_groups(time: torch.Tensor, strata: torch.Tensor | None):
    """perm (sorted position -> row), first-of-group and first-of-stratum flags, group starts."""
    n = time.numel()
    if strata is None:
        t_sorted, perm = torch.sort(time, stable=True)
        s_sorted = None
    else:
        p1 = torch.sort(time, stable=True).indices
        s_sorted, p2 = torch.sort(strata[p1], stable=True)
        perm = p1[p2]
        t_sorted = time[perm]
    gstart = torch.ones(n, dtype=torch.bool, device=time.device)
    gstart[1:] = t_sorted[1:] != t_sorted[:-1]
    sstart = None
    if s_sorted is not None:
        sstart = torch.ones(n, dtype=torch.bool, device=time.device)
        sstart[1:] = s_sorted[1:] != s_sorted[:-1]
        gstart = gstart | sstart
    positions = torch.arange(n, device=time.device)
    start_of = torch.cummax(torch.where(gstart, positions, 0), 0).values
    return perm, gstart.view(torch.uint8), None if sstart is None else sstart.view(torch.uint8), start_of


@torch.library.custom_op("lungcore::cox_ph_loss", mutates_args=())
def _cox_op(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, weights: torch.Tensor | None,
            strata: torch.Tensor | None, ties: str, reduction: str, impl: str,
            block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, torch.Tensor]:
    """(loss, event weight, perm, start_of, gstart, sstart, stats); the last five feed backward."""
    efron = ties == "efron"
    reduce = reduction != "none"
    acc = _acc(risk.dtype)
    empty_i = risk.new_empty(0, dtype=torch.int64)
    empty_u = risk.new_empty(0, dtype=torch.uint8)
    if impl == "cpu":
        from lungcore import _C

        backend.record_launch("cox_ph_loss.cpu_forward")
        terms, total, norm, order = _C.cox_forward(
            risk.detach().to(torch.float64).numpy(), time.detach().to(torch.float64).numpy(),
            event.numpy(), None if weights is None else weights.to(torch.float64).numpy(),
            None if strata is None else strata.to(torch.int64).numpy(), efron)
        norm_t = torch.tensor(norm, dtype=acc)
        loss = torch.from_numpy(terms).to(acc) if not reduce else torch.tensor(total, dtype=acc)
        if reduction == "mean":
            loss = loss / torch.where(norm_t > 0, norm_t, torch.ones_like(norm_t))
        return (loss, norm_t, torch.from_numpy(order), empty_i, empty_u, empty_u.clone(),
                risk.new_empty((0, 0), dtype=acc))
    from lungcore.triton_kernels import cox as kernels

    perm, gstart, sstart, start_of = _sort_groups(time, strata)
    loss, norm, stats = kernels.cox_forward(risk, perm, weights, event, gstart, sstart, start_of,
                                            efron=efron, reduce=reduce, block=block or None)
    if reduce:
        if reduction == "mean":
            loss = loss / torch.where(norm > 0, norm, torch.ones_like(norm))
    else:
        norm = loss.new_zeros(())
    return (loss, norm, perm, start_of, gstart, sstart if sstart is not None else empty_u, stats)


@_cox_op.register_fake
def _(risk, time, event, weights, strata, ties, reduction, impl, block):
    n = risk.shape[0]
    acc = _acc(risk.dtype)
    loss = risk.new_empty(() if reduction != "none" else (n,), dtype=acc)
    norm = risk.new_empty((), dtype=acc)
    perm = risk.new_empty(n, dtype=torch.int64)
    if impl == "cpu":
        return (loss, norm, perm, risk.new_empty(0, dtype=torch.int64), risk.new_empty(0, dtype=torch.uint8),
                risk.new_empty(0, dtype=torch.uint8), risk.new_empty((0, 0), dtype=acc))
    return (loss, norm, perm, risk.new_empty(n, dtype=torch.int64), risk.new_empty(n, dtype=torch.uint8),
            risk.new_empty(n if strata is not None else 0, dtype=torch.uint8), risk.new_empty((4, n), dtype=acc))


def _setup_context(ctx, inputs, output):
    risk, time, event, weights, strata, ties, reduction, impl, block = inputs
    loss, norm, perm, start_of, gstart, sstart, stats = output
    ctx.save_for_backward(risk, time, event, weights, strata, norm, perm, start_of, gstart, sstart, stats)
    ctx.ties, ctx.reduction, ctx.impl, ctx.block = ties, reduction, impl, block


@torch.library.custom_op("lungcore::cox_ph_loss_backward", mutates_args=())
def _cox_backward_op(grad_loss: torch.Tensor, risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                     weights: torch.Tensor | None, strata: torch.Tensor | None, norm: torch.Tensor,
                     perm: torch.Tensor, start_of: torch.Tensor, gstart: torch.Tensor, sstart: torch.Tensor,
                     stats: torch.Tensor, ties: str, reduction: str, impl: str, block: int) -> torch.Tensor:
    """d loss / d risk (a separate op, so torch.compile traces the backward as one opaque call)."""
    efron = ties == "efron"
    per_row = reduction == "none"
    g = grad_loss
    if reduction == "mean":
        g = g / torch.where(norm > 0, norm, torch.ones_like(norm))
    if impl == "cpu":
        from lungcore import _C

        backend.record_launch("cox_ph_loss.cpu_backward")
        n = risk.numel()
        g64 = g.detach().to(torch.float64).reshape(-1)
        g64 = g64.expand(n).contiguous() if not per_row else g64.contiguous()
        grad = _C.cox_backward(
            risk.detach().to(torch.float64).numpy(), time.detach().to(torch.float64).numpy(), event.numpy(),
            None if weights is None else weights.to(torch.float64).numpy(),
            None if strata is None else strata.to(torch.int64).numpy(), efron, perm.numpy(), g64.numpy())
        return torch.from_numpy(grad).to(risk.dtype)
    from lungcore.triton_kernels import cox as kernels

    return kernels.cox_backward(risk, perm, weights, event, gstart, sstart if strata is not None else None,
                                start_of, stats, g.reshape(-1) if per_row else g.reshape(1), per_row=per_row,
                                efron=efron, block=block or None)


@_cox_backward_op.register_fake
def _(grad_loss, risk, *rest):
    return torch.empty_like(risk)


def _backward(ctx, grad_loss, *unused):
    risk, time, event, weights, strata, norm, perm, start_of, gstart, sstart, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    grad_risk = _cox_backward_op(grad_loss.contiguous(), risk, time, event, weights, strata, norm, perm,
                                 start_of, gstart, sstart, stats, ctx.ties, ctx.reduction, ctx.impl, ctx.block)
    return grad_risk, None, None, None, None, None, None, None, None


_cox_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# public function

def _validate_values(risk, time, event, weights, mask) -> None:
    """One device sync for every value check; the slow path names the first bad entry."""
    valid = mask if mask is not None else None
    t = time if valid is None else torch.where(valid, time, torch.zeros_like(time))
    e = event if valid is None else torch.where(valid, event, torch.zeros_like(event))
    ok = [torch.isfinite(risk).all()]
    if time.is_floating_point():
        ok.append((torch.isfinite(t) & (t >= 0)).all())
    else:
        ok.append((t >= 0).all())
    ok.append(((e == 0) | (e == 1)).all())
    if weights is not None:
        ok.append((torch.isfinite(weights) & (weights >= 0)).all())
    if all(torch.stack(ok).tolist()):
        return
    checks.finite("risk", checks.host_1d("risk", risk.float() if risk.dtype in (torch.float16, torch.bfloat16) else risk))
    checks.nonnegative("time", checks.finite("time", checks.host_1d("time", t)))
    checks.binary("event", e)
    if weights is not None:
        checks.nonnegative("weights", checks.finite("weights", checks.host_1d("weights", weights)))


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, *, ties: Ties = "efron",
                reduction: Reduction = "mean", weights: torch.Tensor | None = None,
                strata: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                distributed: bool = False, process_group: ProcessGroup | None = None, validate: bool = True,
                block: int | None = None) -> torch.Tensor:
    """Negative Cox log partial likelihood of log-hazards ``risk`` (higher = earlier event).

    Args:
        risk: (B,) or (B, 1) float16/bfloat16/float32/float64 log-hazards (the model output).
        time: (B,) follow-up times >= 0 (any real dtype).
        event: (B,) 1/True = event observed, 0/False = censored.
        ties: ``"efron"`` (default, what lifelines and R use) or ``"breslow"``.
        reduction: ``"mean"`` (sum / total event weight = per event), ``"sum"`` (= minus the log
            partial likelihood) or ``"none"`` ((B,) per-row terms, 0 for censored rows).
        weights: (B,) non-negative case weights (R/lifelines semantics for Efron); no gradient.
        strata: (B,) integer stratum labels; risk sets never cross strata.
        mask: (B,) bool, False removes a row from every risk set (endpoint absent).
        distributed: gather the batch from every rank of ``process_group`` (see module doc).
        validate: check values (NaN/inf risk, negative or NaN times, events not 0/1, negative
            weights) with one device sync; skipped automatically inside ``torch.compile``.
        block: subjects per Triton program (tests use small blocks; None = by size).

    Returns:
        A 0-d tensor (float32, or float64 for float64 risk), or (B,) for ``reduction="none"``.

    Example:
        >>> import torch
        >>> risk = torch.randn(8, requires_grad=True)
        >>> time = torch.randint(0, 5, (8,)).float(); event = torch.rand(8) < 0.7
        >>> cox_ph_loss(risk, time, event).backward()
        >>> risk.grad.shape
        torch.Size([8])
    """
    checks.one_of("ties", ties, ("efron", "breslow"))
    checks.one_of("reduction", reduction, ("mean", "sum", "none"))
    if block is not None and not (is_integer(block, 1) and int(block) & (int(block) - 1) == 0):
        raise ValueError(f"block must be None or a power of two >= 1 (a Triton program's width), got {block!r}")
    checks.tensor("risk", risk, ndim=(1, 2), dtypes=_FLOAT)
    if risk.dim() == 2:
        checks.shape("risk", risk, (None, 1))
        risk = risk.reshape(-1)
    device = risk.device
    time = checks.tensor("time", torch.as_tensor(time, device=device) if not isinstance(time, torch.Tensor) else time,
                         ndim=1, device=device)
    event = checks.tensor("event", torch.as_tensor(event, device=device) if not isinstance(event, torch.Tensor) else event,
                          ndim=1, device=device)
    if time.dtype == torch.bool or time.is_complex():
        raise TypeError(f"time must hold real numbers, got dtype {time.dtype}")
    lengths = {"risk": risk, "time": time, "event": event}
    if weights is not None:
        lengths["weights"] = checks.tensor("weights", weights, ndim=1, dtypes=_FLOAT, device=device)
    if strata is not None:
        checks.tensor("strata", strata, ndim=1, device=device)
        if strata.is_floating_point() or strata.is_complex():
            raise TypeError(f"strata must hold integer labels, got dtype {strata.dtype}")
        lengths["strata"] = strata
    if mask is not None:
        lengths["mask"] = checks.tensor("mask", mask, ndim=1, dtypes=(torch.bool,), device=device)
    checks.same_length(**lengths)
    if validate and not torch.compiler.is_compiling():
        _validate_values(risk, time, event, weights, mask)

    if distributed:
        from lungcore.ops._distributed import gather_batch

        own, risk, time, event, weights, strata, mask = gather_batch(
            risk, time, event, weights, strata, mask, group=process_group)
        terms = cox_ph_loss(risk, time, event, ties=ties, reduction=reduction, weights=weights, strata=strata,
                            mask=mask, validate=False, block=block)
        # "none": this rank's own rows; summed over ranks they give the global sum (and the
        # gather's backward adds every rank's share of the gradient)
        return terms[own] if reduction == "none" else terms

    n = risk.numel()
    if n == 0:
        zero = risk.sum().to(_acc(risk.dtype)) * 0.0
        return zero.reshape(0) if reduction == "none" else zero

    impl = backend.backend_for("cox_ph_loss", device)
    if impl == "reference":
        return cox_ph_loss_reference(risk, time, event, ties=ties, reduction=reduction,
                                     weights=weights, strata=strata, mask=mask)
    ev = event != 0
    w = weights
    if mask is not None:
        ev = ev & mask
        w = mask.to(_acc(risk.dtype)) if w is None else torch.where(mask, w, torch.zeros_like(w))
        time = torch.where(mask, time, torch.zeros_like(time))
    if w is not None:
        w = w.to(_acc(risk.dtype)).contiguous()
    loss, *_ = _cox_op(risk.contiguous(), time.contiguous(), ev.contiguous().view(torch.uint8), w,
                       None if strata is None else strata.to(torch.int64).contiguous(),
                       ties, reduction, impl, int(block or 0))
    return loss
