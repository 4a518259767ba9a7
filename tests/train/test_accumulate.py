"""Gradient accumulation in the trainer's epoch loop: k micro-batches = one k-times larger batch
(mean-reduced losses, plain SGD, so the updates must agree to rounding), including a last group
with fewer micro-batches than ``accumulate``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lungcore.train import TrainConfig
from lungcore.train.checkpoints import TrainerState
from lungcore.train.trainer import train_epoch


class _Regressor(nn.Module):
    """A tiny model with the trainer's contract: ``model(batch, stage) -> (loss, logs)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))

    def forward(self, batch, stage):
        loss = ((self.net(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        return loss, {"loss": float(loss.detach())}


def _batches(x, y, size):
    return [{"x": x[i:i + size], "y": y[i:i + size], "id": [f"s{k}" for k in range(i, min(i + size, len(x)))]}
            for i in range(0, len(x), size)]


class _Loader(list):
    """What train_epoch reads of a DataLoader: iteration, len, batch_size, drop_last, sampler."""

    def __init__(self, batches, size, n):
        super().__init__(batches)
        self.batch_size, self.drop_last, self.sampler = size, False, range(n)


def _epoch(batches, size, n, accumulate, lr=0.1):
    model = _Regressor()
    cfg = TrainConfig.from_dict({"model": "toy_survival", "progress": False, "precision": "fp32",
                                 "optim": {"optimizer": "sgd", "lr": lr, "momentum": 0.0, "accumulate": accumulate,
                                           "grad_clip": 0.0}})
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    state = TrainerState()
    train_epoch(model, model, _Loader(batches, size, n), "train", opt, lambda step: lr, state, cfg,
                torch.device("cpu"), "test", last_pt=Path("last.pt"))
    return model, state.step


@pytest.mark.parametrize("n, micro, accumulate", [(16, 4, 2), (16, 4, 4), (12, 4, 2), (20, 4, 3)])
def test_accumulated_micro_batches_equal_one_large_batch(n, micro, accumulate):
    g = torch.Generator().manual_seed(n + micro + accumulate)
    x, y = torch.randn(n, 5, generator=g), torch.randn(n, generator=g)
    accumulated, steps = _epoch(_batches(x, y, micro), micro, n, accumulate)
    # reference: one SGD step per group, on the mean loss of exactly the samples of that group
    ref = _Regressor()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    group = micro * accumulate
    for s in range(0, n, group):
        opt.zero_grad()
        loss, _ = ref({"x": x[s:s + group], "y": y[s:s + group]}, "train")  # a short last group: its own mean
        loss.backward()
        opt.step()
    assert steps == -(-n // group)
    for a, b in zip(accumulated.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
