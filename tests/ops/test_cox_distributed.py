"""Distributed Cox loss on 2 gloo ranks (CPU) equals one process on the concatenated batch:
the loss value, the gradient of each rank's own risk (x world size, see _distributed.py) and the
DistributedDataParallel parameter gradients. Ranks hold different batch sizes on purpose."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _data():
    g = torch.Generator().manual_seed(7)
    n = 23
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    time = torch.randint(0, 6, (n,), generator=g).double()          # heavy ties across ranks
    event = torch.rand(n, generator=g) < 0.6
    strata = torch.randint(0, 2, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.9
    weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return x, time, event, strata, mask, weights


SPLIT = 10  # rank 0 holds rows [0, 10), rank 1 rows [10, 23)


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1).double()


def _single(impl: str, ties: str, reduction: str):
    from lungcore.backend import use_backend
    from lungcore.ops import cox_ph_loss

    x, time, event, strata, mask, weights = _data()
    model = _model()
    risk = model(x).squeeze(1)
    risk.retain_grad()
    with use_backend(impl):
        loss = cox_ph_loss(risk, time, event, ties=ties, reduction=reduction, strata=strata, mask=mask,
                           weights=weights)
    loss.sum().backward()
    return loss.detach().clone(), risk.grad.clone(), [p.grad.clone() for p in model.parameters()]


def _worker(rank: int, init_file: str, impl: str, ties: str, reduction: str, queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        from lungcore.backend import use_backend
        from lungcore.nn import CoxPHLoss

        x, time, event, strata, mask, weights = _data()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        model = torch.nn.parallel.DistributedDataParallel(_model())
        risk = model(x[rows]).squeeze(1)
        risk.retain_grad()
        loss_fn = CoxPHLoss(ties=ties, reduction=reduction, distributed=True)
        with use_backend(impl):
            loss = loss_fn(risk, time[rows], event[rows], weights=weights[rows], strata=strata[rows], mask=mask[rows])
        loss.sum().backward()   # "none": each rank sums its own rows' terms
        # plain lists: tensors in a Queue travel by shared memory that dies with this process
        queue.put((rank, loss.detach().reshape(-1).tolist(), risk.grad.tolist(),
                   [p.grad.tolist() for p in model.parameters()], None))
    except Exception as exc:  # report instead of hanging the parent
        queue.put((rank, None, None, None, repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("impl,ties,reduction", [("cpu", "efron", "mean"), ("reference", "breslow", "sum"),
                                                 ("cpu", "efron", "none")])
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(impl, ties, reduction):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    ref_loss, ref_risk_grad, ref_param_grads = _single(impl, ties, reduction)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, init_file, impl, ties, reduction, queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=240) for _ in range(WORLD))
        for p in procs:
            p.join(timeout=60)
    for rank, loss, risk_grad, param_grads, error in results:
        assert error is None, f"rank {rank}: {error}"
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        want = ref_loss[rows] if reduction == "none" else ref_loss.reshape(1)
        assert torch.allclose(torch.tensor(loss, dtype=torch.float64), want, rtol=1e-12, atol=1e-12)
        # sum/mean: every rank holds the same loss, so its own risk receives the sum over ranks
        # of identical gradients (x WORLD) and DDP's mean over ranks gives the single-process
        # parameter gradients. "none": ranks hold disjoint terms whose sum is the global sum, so
        # the risk gradient is the single-process one and DDP's mean divides by WORLD.
        factor = 1.0 if reduction == "none" else float(WORLD)
        risk_grad = torch.tensor(risk_grad, dtype=torch.float64)
        param_grads = [torch.tensor(g, dtype=torch.float64) for g in param_grads]
        assert torch.allclose(risk_grad, factor * ref_risk_grad[rows], rtol=1e-10, atol=1e-12)
        for got, want in zip(param_grads, ref_param_grads):
            assert torch.allclose(got, want * factor / WORLD, rtol=1e-10, atol=1e-12)
