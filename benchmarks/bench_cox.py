"""Cox PH loss, forward + backward: lungcore vs eager PyTorch vs torch.compile vs peers.

Providers (each one full step: loss, then d loss / d risk):
    lungcore        ``cox_ph_loss`` (Efron), automatic backend: the C++ core on CPU, Triton on CUDA
    eager           pycox-style ``logcumsumexp`` over the time-sorted batch (ignores ties: the
                    cheap loss most code uses; it is the speed baseline, not a correctness one)
    reference       lungcore's exact Efron reference in plain PyTorch
    compiled-ref    ``torch.compile`` of that reference
    torchsurv       ``torchsurv.loss.cox.neg_partial_log_likelihood`` (Efron), when installed
    pycox           ``pycox.models.loss.cox_ph_loss`` (Breslow-free, ignores ties), when installed
    torch.sort      sorting the times alone (CUDA only: the floor every exact method pays)

Time distributions: ``days`` = integer days in [0, 2000) (many ties, like real follow-up) and
``continuous`` (no ties). ``check`` asserts, before timing, that lungcore equals the float64
reference (and torchsurv, with reduction "sum", where it is exact: it shares the Efron
definition) and, on the tie-free case, the eager loss.
"""
from __future__ import annotations

import importlib.util

import torch

from benchmarks import floors
from benchmarks.harness import Case
from lungcore.ops import cox_ph_loss, cox_ph_loss_reference

NAME = "cox"


def _data(n: int, kind: str, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    risk = torch.randn(n, generator=g)
    if kind == "days":
        time = torch.randint(0, 2000, (n,), generator=g).float()
    else:
        time = torch.rand(n, generator=g) * 2000.0
    event = torch.rand(n, generator=g) < 0.7
    return risk.to(device), time.to(device), event.to(device)


def eager_cox(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """pycox-style loss: sort by time descending, log-cumsum-exp, mean over events (no ties)."""
    order = torch.argsort(time, descending=True)
    log_h, ev = risk[order], event[order].to(risk.dtype)
    gamma = log_h.max().detach()
    log_cumsum = torch.logcumsumexp(log_h - gamma, 0) + gamma
    return -((log_h - log_cumsum) * ev).sum() / ev.sum().clamp_min(1.0)


def _step(fn, risk):
    def run():
        r = risk.detach().requires_grad_()
        loss = fn(r)
        loss.backward()
        return loss
    return run


def sizes(device: str, quick: bool) -> list[int]:
    """The benchmark batch sizes (subjects); benchmarks.aot and the floors use them too."""
    if device == "cuda":
        return [1 << 16, 1 << 20] if quick else [1 << 16, 1 << 18, 1 << 20, 1 << 22]
    return [4_096, 65_536] if quick else [4_096, 65_536, 262_144]


def cases(device: str, quick: bool) -> list[Case]:
    sizes_ = sizes(device, quick)
    have_torchsurv = importlib.util.find_spec("torchsurv") is not None
    have_pycox = importlib.util.find_spec("pycox") is not None
    out = []
    for kind in ("days", "continuous"):
        for n in sizes_:
            risk, time, event = _data(n, kind, device)
            t, e = time, event  # bound as defaults below (a loop variable would bind late)
            providers = {
                "lungcore": _step(lambda r, t=t, e=e: cox_ph_loss(r, t, e, ties="efron", reduction="sum"), risk),
                "eager": _step(lambda r, t=t, e=e: eager_cox(r, t, e), risk),
            }
            if n <= 65_536 or device == "cuda":
                providers["reference"] = _step(
                    lambda r, t=t, e=e: cox_ph_loss_reference(r, t, e, ties="efron", reduction="sum"), risk)
                compiled = torch.compile(cox_ph_loss_reference, dynamic=False)
                providers["compiled-ref"] = _step(
                    lambda r, t=t, e=e, c=compiled: c(r, t, e, ties="efron", reduction="sum"), risk)
            if have_torchsurv:
                from torchsurv.loss.cox import neg_partial_log_likelihood

                def torchsurv_loss(r, time=time, event=event):
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return neg_partial_log_likelihood(r, event, time, ties_method="efron", reduction="sum")

                providers["torchsurv"] = _step(torchsurv_loss, risk)
            if have_pycox:
                from pycox.models.loss import cox_ph_loss as pycox_loss

                providers["pycox"] = _step(lambda r, t=t, e=e: pycox_loss(r, t, e.float()), risk)
            if device == "cuda":
                providers["torch.sort"] = lambda time=time: torch.sort(time)

            def check(risk=risk, time=time, event=event, kind=kind, providers=providers):
                exact = float(cox_ph_loss_reference(risk.double(), time, event, reduction="sum"))
                ours = float(cox_ph_loss(risk, time, event, reduction="sum"))
                assert abs(ours / exact - 1) < 1e-5, (ours, exact)
                if "torchsurv" in providers:
                    theirs = float(providers["torchsurv"]().detach())
                    assert abs(theirs / exact - 1) < 1e-4, ("torchsurv", theirs, exact)
                if kind == "continuous":
                    mean = float(cox_ph_loss(risk, time, event))
                    assert abs(float(eager_cox(risk, time, event)) / mean - 1) < 1e-4

            out.append(Case(shape=f"{kind} n={n:,}", size=n, providers=providers, baseline="eager",
                            check=check, floor=floors.cox(n, risk.element_size(), time.element_size()), note="fwd+bwd, Efron"))
    return out
