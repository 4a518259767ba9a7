"""Every kernel at its op's headline benchmark shape on a GPU (the campaign's correctness step).

For each op and dtype (fp32 / fp16 / bf16; the Cox loss also fp64): fresh random inputs each run
(the seed is printed), the device's free cache filled with NaN first (so an output element no
kernel writes shows up as NaN), forward and every gradient against a float64 reference with
DESIGN.md's tolerances, the kernels proven to have run (launch counters), and a rerun on the same
inputs that must be bit-identical (no kernel here uses atomics: a moving result is a race).
The CPU twins run the same checks through the Triton interpreter at tiny shapes, so the checks
themselves are tested in CI.
"""
from __future__ import annotations

import random

import pytest
import torch
from _tolerance import rel_error, tolerance

from lungcore.backend import count_launches, use_backend
from lungcore.ops import (cox_ph_loss, cox_ph_loss_reference, masked_cross_attention,
                          masked_cross_attention_reference, patch_embed3d, patch_embed3d_reference)

LOW = (torch.float16, torch.bfloat16)


def _tol(dtype: torch.dtype, dot: bool) -> float:
    if dtype == torch.float64:
        return 1e-10
    return tolerance(dtype, dot=dot, device="cuda")


_rel = rel_error


def _poison_cache(device: str) -> None:
    """Fill the caching allocator's free blocks with NaN: outputs allocated next start as NaN."""
    if device != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    n = min(int(free * 0.5), 8 << 30) // 4
    junk = torch.full((n,), float("nan"), device="cuda")
    del junk


def _seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    return seed


def _twice(fn):
    """Run ``fn`` twice on the same inputs; the results must be bit-identical."""
    first = [t.detach().clone() for t in fn()]
    second = fn()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two runs on the same inputs: a race"
    return first


# ------------------------------------------------------------------------------------ attention
def check_attention(device: str, dtype: torch.dtype, b: int, h: int, lq: int, lk: int, d: int) -> None:
    g = torch.Generator().manual_seed(_seed())
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    km = torch.rand(b, lk, generator=g) < 0.5
    km[:, 0] = True
    qm = torch.rand(b, lq, generator=g) < 0.9
    grad = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    # the float64 reference runs on the same device (fast on a GPU, exact either way)
    refs = [t.clone().to(device).requires_grad_() for t in (q, k, v)]
    ref = masked_cross_attention_reference(*refs, key_mask=km.to(device), query_mask=qm.to(device))
    ref.backward(grad.to(device))
    xs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    kmd, qmd, gd = km.to(device), qm.to(device), grad.to(device, dtype)

    def run():
        for x in xs:
            x.grad = None
        _poison_cache(device)
        with use_backend("triton"):
            out = masked_cross_attention(*xs, key_mask=kmd, query_mask=qmd)
            out.backward(gd)
        return [out, *[x.grad for x in xs]]

    with count_launches() as launches:
        got = _twice(run)
    assert launches["masked_cross_attention.forward"] == 2 and launches["masked_cross_attention.backward_dkdv"] == 2
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, [ref, *[t.grad for t in refs]]):
        assert _rel(a, r) < _tol(dtype, dot=True), (name, dtype, _rel(a, r))


# ---------------------------------------------------------------------------------- patch embed
def check_patch_embed(device: str, dtype: torch.dtype, B: int, spatial, patch, E: int, ratio: float) -> None:
    g = torch.Generator().manual_seed(_seed())
    K = patch[0] * patch[1] * patch[2]
    N = (spatial[0] // patch[0]) * (spatial[1] // patch[1]) * (spatial[2] // patch[2])
    T = max(1, round(ratio * N))
    x = torch.randn(B, 1, *spatial, generator=g, dtype=torch.float64)
    w = torch.randn(E, 1, *patch, generator=g, dtype=torch.float64) / K ** 0.5
    bias = torch.randn(E, generator=g, dtype=torch.float64)
    pos = torch.randn(N, E, generator=g, dtype=torch.float64)
    visible = None if ratio == 1.0 else torch.rand(B, N, generator=g).argsort(dim=1)[:, :T]
    grad = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    refs = [t.clone().to(device).requires_grad_() for t in (x, w, bias, pos)]
    ref = patch_embed3d_reference(*refs, None if visible is None else visible.to(device))
    ref.backward(grad.to(device))
    xs = [t.to(device, dtype).requires_grad_() for t in (x, w, bias, pos)]
    vis = None if visible is None else visible.to(device)
    gd = grad.to(device, dtype)

    def run():
        for t in xs:
            t.grad = None
        _poison_cache(device)
        with use_backend("triton"):
            out = patch_embed3d(*xs, vis)
            out.backward(gd)
        return [out, *[t.grad for t in xs]]

    with count_launches() as launches:
        got = _twice(run)
    assert all(launches[f"patch_embed3d.{k}"] == 2 for k in ("forward", "grad_weight", "grad_pos", "grad_volume"))
    for name, a, r in zip(("out", "dvolume", "dweight", "dbias", "dpos"), got, [ref, *[t.grad for t in refs]]):
        assert _rel(a, r) < _tol(dtype, dot=True), (name, dtype, _rel(a, r))


# ------------------------------------------------------------------------------------------ cox
def check_cox(device: str, dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(_seed())
    risk = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).double()   # exactly representable
    time = torch.randint(0, 2000, (n,), generator=g).double()
    event = torch.rand(n, generator=g) < 0.7
    for reduction in ("mean", "none"):
        r_ref = risk.clone().to(device).requires_grad_()
        ref = cox_ph_loss_reference(r_ref, time.to(device), event.to(device), ties="efron", reduction=reduction)
        upstream = torch.rand(ref.shape, generator=g, dtype=torch.float64)
        ref.backward(upstream.to(device))
        r = risk.to(device, dtype).requires_grad_()
        td, ed, ud = time.to(device), event.to(device), upstream.to(device)

        def run():
            r.grad = None
            _poison_cache(device)
            with use_backend("triton"):
                loss = cox_ph_loss(r, td, ed, ties="efron", reduction=reduction)
                loss.backward(ud.to(loss.dtype))
            return [loss, r.grad]

        with count_launches() as launches:
            loss, grad = _twice(run)
        assert launches["cox_ph_loss.scan_apply"] >= 4 and launches["cox_ph_loss.loss"] == 2
        # fp32 accumulation of fp16/bf16 risks: the scan tolerance applies (inputs are exact)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert _rel(loss, ref) < tol, (reduction, dtype, _rel(loss, ref))
        assert _rel(grad.double(), r_ref.grad) < (tol if dtype not in LOW else 2e-2), (reduction, dtype)


# -------------------------------------------------------------------------------- the GPU runs
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 8, 512, 16, 32), (32, 4, 128, 6, 32), (2, 8, 2048, 2048, 64)],
                         ids=["net A cross", "net B cross", "long"])
def test_attention_headline_on_gpu(dtype, shape):
    check_attention("cuda", dtype, *shape)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(16, (32, 128, 128), (4, 16, 16), 256, 0.25),
                                  (16, (32, 128, 128), (4, 16, 16), 256, 1.0),
                                  (4, (96, 96, 96), (16, 16, 16), 768, 0.25)],
                         ids=["network A 0.25", "network A 1.0", "UNETR 0.25"])
def test_patch_embed_headline_on_gpu(dtype, case):
    check_patch_embed("cuda", dtype, *case)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", [65_536, 1 << 20])
def test_cox_headline_on_gpu(dtype, n):
    check_cox("cuda", dtype, n)


# ------------------------------------------------------- the same checks in the interpreter (CI)
def test_attention_checks_in_interpreter():
    check_attention("cpu", torch.float32, 2, 2, 20, 5, 16)


def test_patch_embed_checks_in_interpreter():
    check_patch_embed("cpu", torch.float32, 2, (8, 16, 16), (4, 8, 8), 16, 0.5)


def test_cox_checks_in_interpreter():
    check_cox("cpu", torch.float32, 300)
