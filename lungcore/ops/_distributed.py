"""Cross-rank gathers for losses whose terms couple samples (Cox risk sets, contrastive losses).

``all_gather_with_grad(x)`` concatenates every rank's ``x`` along dim 0 (ranks may hold
different batch sizes) and is differentiable: the backward all-reduces (sums) the gradient of
the concatenated tensor over ranks and returns this rank's slice. When every rank computes the
same loss L from the gathered batch (as ``cox_ph_loss(distributed=True)`` does), the gradient
reaching rank r's own samples is therefore sum_ranks dL/dx_r = world_size * dL/dx_r, and
DistributedDataParallel's mean over ranks gives parameter gradients equal to a single process
training on the concatenated batch. (A gather whose backward kept only the local slice would
give 1/world_size of them.) When ranks instead hold disjoint parts of the loss (per-row terms
of their own samples), the same backward gives each rank d(sum of all parts)/dx_r, and DDP's
mean yields the gradient of (sum of all parts) / world_size: the usual DDP semantics.

Reuse in a training loop: ``all_gather_with_grad(embeddings)`` for any loss whose terms couple
samples across the global batch; ``gather_batch(risk, time, event, ...)`` returns
``(own_rows, risk, time, event, ...)`` with ``own_rows`` the slice of this rank's samples.

``all_gather_no_grad(x)`` is the same gather for labels (time, event, weights, strata, mask).
Works on every backend that implements ``all_gather`` and ``all_reduce`` (gloo on CPU, NCCL on
GPU). Both are no-ops (return ``x``) when ``torch.distributed`` is not initialised.

Example (inside a torchrun job):
    >>> import torch
    >>> from lungcore.ops._distributed import all_gather_with_grad
    >>> all_gather_with_grad(torch.ones(3)).shape  # doctest: +SKIP
    torch.Size([6])
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "all_gather_with_grad", "all_gather_no_grad", "gather_batch"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def _sizes(n: int, device: torch.device, group) -> list[int]:
    world = dist.get_world_size(group)
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s) for s in sizes]


def _gather(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _gather(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, with gradient (see the module doc)."""
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else _sizes(x.shape[0], x.device, group)
    return _AllGather.apply(x, sizes, group)


def all_gather_no_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient; bool tensors allowed)."""
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else _sizes(x.shape[0], x.device, group)
    if x.dtype == torch.bool:  # not every backend gathers bool
        return _gather(x.detach().to(torch.uint8), sizes, group).bool()
    return _gather(x.detach(), sizes, group)


def gather_batch(risk: torch.Tensor, *labels: torch.Tensor | None, group=None):
    """Gather ``risk`` (with gradient) and any number of optional label tensors (``None`` stays
    ``None`` on every rank; all ranks must agree on which are given).

    Returns ``(rows, risk, *labels)`` where ``rows`` is the slice of this rank's own samples in
    the gathered batch (``slice(0, n)`` when not distributed).
    """
    if not is_distributed():
        return (slice(0, risk.shape[0]), risk, *labels)
    sizes = _sizes(risk.shape[0], risk.device, group)
    start = sum(sizes[: dist.get_rank(group)])
    out = [all_gather_with_grad(risk, group, sizes)]
    out += [None if x is None else all_gather_no_grad(x, group, sizes) for x in labels]
    return (slice(start, start + risk.shape[0]), *out)
