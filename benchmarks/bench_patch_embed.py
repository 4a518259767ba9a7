"""3D patch embedding with visible-token gather: lungcore vs the eager baselines and torch.compile.

Providers (all compute tokens = patches @ W^T + bias + pos, for the visible tokens only):
  * ``conv3d``: Conv3d(stride = kernel) on the whole volume, flatten, + pos, then gather the
    visible tokens (what most code does; pays for the masked patches too).
  * ``gather-first`` (the baseline, the one to respect): reshape/permute the volume into patches,
    gather the visible ones, ``F.linear`` + gathered position rows.
  * ``gather-first compiled``: ``torch.compile`` of the same function.
  * ``lungcore``: ``lungcore.ops.patch_embed3d`` with its automatic backend (Triton on CUDA; on
    CPU Conv3d for every token without a gradient, else the gather-first reference), visible sets
    validated.
  * ``lungcore unchecked``: the same with ``check_visible=False`` (no device sync).

Shapes: network A (B=16, 1 x 32 x 128 x 128, patch 4 x 16 x 16, E=256) and a UNETR-like one
(B=4, 1 x 96 x 96 x 96, patch 16, E=768) at visible ratios 1.0 and 0.25; forward ("fwd") and
forward + backward for weight, bias and position embedding ("fwd+bwd"). ``--quick`` on CPU uses
B=2 and B=1. dtype: bf16 on CUDA, fp32 on CPU. The check compares every provider with the
gather-first one before timing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import floors
from benchmarks.harness import Case
from lungcore.ops import patch_embed3d

NAME = "patch_embed"


def conv3d_path(x, w, b, pos, visible):
    out = F.conv3d(x, w, b, stride=tuple(w.shape[2:])).flatten(2).transpose(1, 2) + pos
    if visible is None:
        return out
    return torch.gather(out, 1, visible[:, :, None].expand(-1, -1, out.shape[2]))


def gather_first_path(x, w, b, pos, visible):
    B, C, D, H, W = x.shape
    E, _, pd, ph, pw = w.shape
    nD, nH, nW = D // pd, H // ph, W // pw
    patches = (x.reshape(B, C, nD, pd, nH, ph, nW, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
               .reshape(B, nD * nH * nW, C * pd * ph * pw))
    if visible is None:
        return F.linear(patches, w.reshape(E, -1), b) + pos
    patches = torch.gather(patches, 1, visible[:, :, None].expand(-1, -1, patches.shape[2]))
    return F.linear(patches, w.reshape(E, -1), b) + pos[visible]


def shapes(device: str, quick: bool) -> list[tuple[str, int, int, tuple[int, int, int], tuple[int, int, int], int]]:
    """The benchmark shapes (label, B, C, (D, H, W), patch, E); benchmarks.aot and the floors use them too."""
    small = device != "cuda" and quick
    return [("network A", 2 if small else 16, 1, (32, 128, 128), (4, 16, 16), 256),
            ("UNETR", 1 if small else 4, 1, (96, 96, 96), (16, 16, 16), 768)]


def _compiled_gather_first():
    # one graph per (shape, ratio, grad mode): 8 or more, past dynamo's default limit of 8
    # recompiles, after which it would silently run eager
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    return torch.compile(gather_first_path, dynamic=False)


def cases(device: str, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    compiled = _compiled_gather_first()
    out: list[Case] = []
    for label, B, C, spatial, patch, E in shapes(device, quick):
        g = torch.Generator().manual_seed(0)
        N = 1
        for s, p in zip(spatial, patch):
            N *= s // p
        x = torch.randn(B, C, *spatial, generator=g).to(device, dtype)
        w = (torch.randn(E, C, *patch, generator=g) * 0.02).to(device, dtype)
        bias = torch.zeros(E).to(device, dtype)
        pos = (torch.randn(N, E, generator=g) * 0.02).to(device, dtype)
        for ratio in (1.0, 0.25):
            T = max(1, round(ratio * N))
            visible = None if ratio == 1.0 else torch.rand(B, N, generator=g).argsort(dim=1)[:, :T].to(device)
            fns = {
                "conv3d": conv3d_path,
                "gather-first": gather_first_path,
                "gather-first compiled": compiled,
                "lungcore": lambda *a: patch_embed3d(*a),
            }
            if visible is not None:
                fns["lungcore unchecked"] = lambda *a: patch_embed3d(*a, check_visible=False)
            for mode in ("fwd", "fwd+bwd"):
                params = [t.detach().requires_grad_(mode == "fwd+bwd") for t in (w, bias, pos)]
                grad = torch.randn(B, T, E, generator=g).to(device, dtype)

                def make(fn, x=x, params=params, visible=visible, mode=mode, grad=grad):
                    if mode == "fwd":
                        def run():
                            with torch.no_grad():
                                return fn(x, *params, visible)
                    else:
                        def run():
                            return torch.autograd.grad(fn(x, *params, visible), params, grad)
                    return run

                providers = {name: make(fn) for name, fn in fns.items()}

                def check(providers=providers, mode=mode):
                    results = {name: run() for name, run in providers.items()}
                    ref = results["gather-first"]
                    ref = [ref] if mode == "fwd" else list(ref)
                    tol = 2e-2 if dtype != torch.float32 else (2e-3 if device == "cuda" else 1e-4)
                    for name, got in results.items():
                        got = [got] if mode == "fwd" else list(got)
                        for a, r in zip(got, ref):
                            err = float((a.float() - r.float()).norm() / r.float().norm())
                            if not err < tol:
                                raise AssertionError(f"{name} disagrees with gather-first: rel err {err:.2e}")

                out.append(Case(
                    shape=f"{label} B={B} {C}x{'x'.join(map(str, spatial))} p={'x'.join(map(str, patch))} "
                          f"E={E} ratio={ratio} {mode}",
                    providers=providers, baseline="gather-first", size=B * T, check=check,
                    floor=floors.patch_embed(B, C, spatial, patch, E, ratio, mode == "fwd+bwd", dtype.itemsize),
                    note=f"{mode}, {str(dtype).replace('torch.', '')}"))
    return out
