"""Masked cross-attention: lungcore vs eager vs SDPA-with-mask vs torch.compile vs FlexAttention.

Providers (each left out when it cannot run here, never faked):
    eager          matmul + masked_fill + softmax + matmul (``masked_cross_attention_reference``)
    sdpa           ``F.scaled_dot_product_attention`` with the boolean mask (no Flash backend
                   on CUDA once a mask is given)
    torch.compile  the eager function compiled with inductor
    flex           ``flex_attention`` compiled, block mask from the key mask built once per case
                   (outside the timing: a real model rebuilds it per batch); forward only on
                   CPU, where FlexAttention has no backward
    lungcore       ``lungcore.ops.masked_cross_attention``, automatic dispatch: Triton on CUDA,
                   the SDPA path on CPU (the Triton interpreter is far too slow to time)

Shapes: network A cross-attention (B=32, H=8, Lq=512, Lk=16, D=32), network B (B=32, H=4,
Lq=128, Lk=6, D=32) and a long self-attention (B=4, H=8, L=4096, D=64 on CUDA; scaled down on
CPU), several key-mask densities (every query keeps at least one key, so all providers are
defined), forward and forward+backward. bf16 on CUDA, fp32 on CPU. The check compares every
provider's forward with eager before timing.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from benchmarks import floors
from benchmarks.harness import Case
from lungcore.ops import masked_cross_attention, masked_cross_attention_reference

NAME = "attention"
# one compiled eager function serves every shape and mask: give dynamo room to specialise on
# each case (the default limit of 8 would silently fall back to eager for the later cases)
torch._dynamo.config.recompile_limit = 256


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return create_block_mask, torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=None)
def _compiled_eager():
    return torch.compile(masked_cross_attention_reference, dynamic=False)  # noqa: recompiles per shape


def _inputs(b, h, lq, lk, d, density, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(b, h, lk, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, h, lk, d, generator=gen).to(device=device, dtype=dtype)
    km = torch.rand(b, lk, generator=gen) < density
    km[:, 0] = True
    return q, k, v, km.to(device)


def _providers(q, k, v, km, backward: bool, with_flex: bool):
    mask4 = km[:, None, None, :]
    fns = {
        "eager": lambda q, k, v: masked_cross_attention_reference(q, k, v, key_mask=km),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask4),
        "torch.compile": lambda q, k, v: _compiled_eager()(q, k, v, key_mask=km),
        "lungcore": lambda q, k, v: masked_cross_attention(q, k, v, key_mask=km),
    }
    flex = _flex() if with_flex else None
    if flex is not None:
        create_block_mask, flex_attention = flex
        b, _, lq, _ = q.shape
        lk = k.shape[2]
        block_mask = create_block_mask(lambda bi, hi, qi, ki: km[bi, ki], b, None, lq, lk, device=str(q.device))
        fns["flex"] = lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)
    if not backward:
        return {name: functools.partial(fn, q, k, v) for name, fn in fns.items()}, fns
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)

    def fwd_bwd(fn):
        out = fn(*xs)
        return torch.autograd.grad(out, xs, grad)

    return {name: functools.partial(fwd_bwd, fn) for name, fn in fns.items()}, fns


def shapes(device: str, quick: bool) -> list[tuple[str, tuple[int, int, int, int, int]]]:
    """The benchmark shapes (label, (B, H, Lq, Lk, D)); benchmarks.aot and the floors use them too."""
    if device == "cuda":
        long = (4, 8, 4096, 4096, 64)
    else:
        long = (1, 8, 1024, 1024, 64) if quick else (1, 8, 2048, 2048, 64)
    return [("net A cross", (32, 8, 512, 16, 32)), ("net B cross", (32, 4, 128, 6, 32)), ("long", long)]


def cases(device: str, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    densities = [0.5] if quick else [0.25, 0.5, 0.9]
    out = []
    for label, (b, h, lq, lk, d) in shapes(device, quick):
        for density in densities:
            q, k, v, km = _inputs(b, h, lq, lk, d, density, device, dtype)
            for backward in (False, True):
                # FlexAttention has no CPU backward (NotImplementedError in torch 2.13)
                with_flex = device == "cuda" or not backward
                providers, fns = _providers(q, k, v, km, backward, with_flex)

                def check(fns=fns, q=q, k=k, v=v):
                    with torch.no_grad():
                        hi = torch.float64 if device == "cpu" else torch.float32
                        ref = fns["eager"](q.to(hi), k.to(hi), v.to(hi))
                        for name, fn in fns.items():
                            got = fn(q, k, v).double()
                            err = float((got - ref.double()).norm() / ref.double().norm())
                            limit = 2e-2 if dtype != torch.float32 else 1e-4
                            if not err < limit:
                                raise AssertionError(f"attention provider {name} differs from eager: {err:.2e}")

                mode = "fwd+bwd" if backward else "fwd"
                out.append(Case(
                    shape=f"{label} B={b} H={h} Lq={lq} Lk={lk} D={d} keep={density:g} {mode}",
                    size=b * h * lq * lk, providers=providers, baseline="eager", check=check,
                    note=str(dtype).replace("torch.", ""),
                    floor=floors.attention(b, h, lq, lk, d, backward, itemsize=dtype.itemsize),
                ))
    return out
