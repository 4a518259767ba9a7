"""torchrun / DistributedDataParallel plumbing for :mod:`lungcore.train`.

``lungcore train`` started by ``torchrun --nproc_per_node N -m lungcore train ...`` (or
``torchrun ... $(which lungcore) train ...``) finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
environment and joins the process group (NCCL on CUDA, gloo on CPU). Each rank reads its shard of
every epoch (``DistributedSampler``); the model is wrapped in DDP through :class:`Objective`
(a module whose forward is the model's ``loss``, so DDP's hooks see every training forward), and
every ``lungcore.nn.CoxPHLoss`` inside the model is switched to cross-rank risk sets: the Cox
loss of the concatenated global batch, with parameter gradients equal to one process training on
that batch (see ``lungcore.ops._distributed``).

Example:
    >>> from lungcore.train.distributed import world
    >>> world()
    (0, 1)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a distributed job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def local_device(device: str) -> torch.device:
    if device == "cuda" and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """``obj`` (picklable) from every rank, in rank order; ``[obj]`` outside a distributed job."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (a NaN on one rank stops them all)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() == 0)


def cox_losses(model: nn.Module) -> list[nn.Module]:
    from lungcore.nn.survival import CoxPHLoss

    return [m for m in model.modules() if isinstance(m, CoxPHLoss)]


@contextlib.contextmanager
def cross_rank_cox(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block the Cox losses of ``model`` gather their risk sets over all ranks
    (``enabled``) or keep them local (evaluation on one rank must not wait for the others).

    Networks compute their Cox loss with ``lungcore.nn.CoxPHLoss`` submodules; their
    ``distributed`` flag is set for the block. Outside a process group it is a no-op.
    """
    losses = cox_losses(model)
    saved = [m.distributed for m in losses]
    for m in losses:
        m.distributed = enabled
    try:
        yield
    finally:
        for m, s in zip(losses, saved):
            m.distributed = s


class Objective(nn.Module):
    """``forward(batch, stage)`` = ``model.loss(batch, stage)``: what DDP wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, stage: str):
        return self.model.loss(batch, stage)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The objective, DDP-wrapped when a process group is up (unused parameters allowed: a stage
    may train only part of the network, e.g. CMML's decoders during pretraining)."""
    objective = Objective(model)
    if not (dist.is_available() and dist.is_initialized()):
        return objective
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=True)


def no_sync(wrapped: nn.Module, skip: bool):
    """DDP's no_sync for the micro-batches of an accumulation that do not step the optimiser."""
    if skip and isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()
