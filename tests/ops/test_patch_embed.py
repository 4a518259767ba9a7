"""patch_embed3d: Triton kernels (forced; interpreter on CPU) vs Conv3d and gather-first references."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tolerance import rel_error, tolerance

from lungcore.backend import count_launches, use_backend
from lungcore.ops import patch_embed3d, patch_embed3d_reference
from lungcore.ops.patch_embed import _triton

KERNELS = ("patch_embed3d.forward", "patch_embed3d.grad_weight", "patch_embed3d.grad_pos",
           "patch_embed3d.grad_volume")


def _tol(dtype: torch.dtype, device: str) -> float:
    return tolerance(dtype, dot=True, device=device)  # tf32 tl.dot on a GPU


_rel = rel_error


def _visible(rng, B: int, N: int, T: int, device: str, dtype=torch.int64) -> torch.Tensor:
    rows = np.stack([rng.permutation(N)[:T] for _ in range(B)])     # distinct, unsorted
    return torch.tensor(rows, dtype=dtype, device=device)


def _inputs(rng, B, C, spatial, patch, E, device, pad=False):
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    w = torch.randn(E, C, *patch, generator=g, dtype=torch.float64) / (C * patch[0] * patch[1] * patch[2]) ** 0.5
    b = torch.randn(E, generator=g, dtype=torch.float64)
    grid = [-(-s // p) for s, p in zip(spatial, patch)]
    N = grid[0] * grid[1] * grid[2]
    pos = torch.randn(N, E, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (x, w, b, pos)], N


def conv3d_reference(x, w, b, pos, visible, pad=False):
    """The independent oracle: Conv3d(stride = kernel) on the whole volume, flatten, add, gather."""
    p = tuple(w.shape[2:])
    if pad:
        x = F.pad(x, [0, -x.shape[4] % p[2], 0, -x.shape[3] % p[1], 0, -x.shape[2] % p[0]])
    out = F.conv3d(x, w, b, stride=p).flatten(2).transpose(1, 2)
    if pos is not None:
        out = out + pos
    if visible is not None:
        out = torch.gather(out, 1, visible.long()[:, :, None].expand(-1, -1, out.shape[2]))
    return out


def _check_forward_backward(inputs, visible, device, dtype=torch.float32, pad=False, need_volume=True):
    x, w, b, pos = inputs
    ref_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_in[0].requires_grad_(need_volume)
    ref = conv3d_reference(*ref_in, visible, pad)
    grad = torch.randn(ref.shape, dtype=torch.float64, device=device)
    ref.backward(grad)
    ker_in = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    ker_in[0].requires_grad_(need_volume)
    with use_backend("triton"), count_launches() as launches:
        out = patch_embed3d(*ker_in, visible, pad=pad)
        out.backward(grad.to(dtype))
    tol = _tol(dtype, device)
    assert out.dtype == dtype and out.shape == ref.shape
    assert _rel(out, ref) < tol, ("forward", _rel(out, ref))
    names = ("volume", "weight", "bias", "pos_embed")
    for name, k, r in zip(names, ker_in, ref_in):
        if not r.requires_grad:
            assert k.grad is None
            continue
        assert k.grad.dtype == dtype
        assert _rel(k.grad, r.grad) < tol, (name, _rel(k.grad, r.grad))
    expected = set(KERNELS) if need_volume else set(KERNELS) - {"patch_embed3d.grad_volume"}
    assert set(launches) == expected and all(n == 1 for n in launches.values()), launches
    return out


@pytest.mark.parametrize("patch,spatial", [((4, 16, 16), (8, 32, 16)), ((2, 2, 2), (4, 6, 4)),
                                           ((1, 8, 8), (3, 16, 8))])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("ratio", [None, 1.0, 0.5, 0.25])
def test_kernel_matches_conv3d(rng, device, patch, spatial, channels, ratio):
    inputs, N = _inputs(rng, 2, channels, spatial, patch, 24, device)
    visible = None if ratio is None else _visible(rng, 2, N, max(1, round(ratio * N)), device)
    _check_forward_backward(inputs, visible, device)


def test_kernel_matches_gather_first_reference(rng, device):
    inputs, N = _inputs(rng, 3, 2, (4, 8, 12), (2, 4, 4), 20, device)
    visible = _visible(rng, 3, N, 7, device, dtype=torch.int32)
    x, w, b, pos = (t.float() for t in inputs)
    ref = patch_embed3d_reference(x, w, b, pos, visible)
    with use_backend("triton"), count_launches() as launches:
        out = patch_embed3d(x, w, b, pos, visible)
    assert launches["patch_embed3d.forward"] == 1
    assert _rel(out, ref) < _tol(torch.float32, device)
    # the gather-first reference itself agrees with Conv3d
    assert _rel(patch_embed3d_reference(*inputs, visible), conv3d_reference(*inputs, visible)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(rng, device, dtype):
    inputs, N = _inputs(rng, 2, 1, (4, 16, 16), (2, 8, 8), 32, device)
    _check_forward_backward(inputs, _visible(rng, 2, N, 5, device), device, dtype)
    _check_forward_backward(inputs, None, device, dtype)


def _check_reference_dtype_under_autocast(rng, device, amp_dtype, input_dtype, with_pos, with_visible):
    inputs, N = _inputs(rng, 2, 2, (4, 8, 12), (2, 4, 4), 20, device)
    x, w, b, pos = (t.to(input_dtype) for t in inputs)
    pos = pos if with_pos else None
    visible = _visible(rng, 2, N, 7, device) if with_visible else None
    backends = ["torch", "reference"]
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    with torch.autocast(device, dtype=amp_dtype):
        ref = patch_embed3d_reference(x, w, b, pos, visible)
        outs = {}
        for name in backends:
            with use_backend(name), count_launches() as launches:
                outs[name] = patch_embed3d(x, w, b, pos, visible)
            assert (launches["patch_embed3d.forward"] == 1) == (name == "triton")
    # the op's inputs are rounded to the autocast dtype; a float64 Conv3d on those is the oracle
    exact = conv3d_reference(*(None if t is None else t.to(amp_dtype).double() for t in (x, w, b, pos)), visible)
    assert ref.dtype == amp_dtype, (ref.dtype, amp_dtype)
    assert _rel(ref, exact) < _tol(amp_dtype, device)
    for name, out in outs.items():
        assert out.dtype == ref.dtype, (name, out.dtype, ref.dtype)
        assert out.shape == ref.shape
        assert _rel(out, ref) < _tol(amp_dtype, device), (name, _rel(out, ref))


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("with_pos,with_visible", [(True, True), (True, False), (False, True), (False, False)])
def test_reference_returns_the_op_dtype_under_cpu_autocast(rng, input_dtype, with_pos, with_visible):
    """Under CPU autocast (bf16) the reference returns bf16 like the op on every backend (it returned
    float32 for fp32/fp16 inputs: F.linear autocast to bf16, then the position add promoted back, and
    float64 for float64 inputs, which autocast does not cast), with values within the bf16 tolerance."""
    _check_reference_dtype_under_autocast(rng, "cpu", torch.bfloat16, input_dtype, with_pos, with_visible)


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_reference_returns_the_op_dtype_under_cuda_autocast(rng, amp_dtype, input_dtype):
    _check_reference_dtype_under_autocast(rng, "cuda", amp_dtype, input_dtype, True, True)


def test_odd_sizes_and_padding(rng, device):
    # E, M, K all off the block sizes; volume not a multiple of the patch -> pad=True
    inputs, N = _inputs(rng, 3, 2, (5, 9, 7), (2, 4, 4), 37, device)
    assert N == 3 * 3 * 2
    _check_forward_backward(inputs, None, device, pad=True)
    _check_forward_backward(inputs, _visible(rng, 3, N, 11, device), device, pad=True)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patch_embed3d(inputs[0].float(), inputs[1].float())


def test_without_bias_pos_and_volume_grad(rng, device):
    (x, w, _, _), N = _inputs(rng, 2, 1, (4, 8, 8), (2, 4, 4), 16, device)
    visible = _visible(rng, 2, N, 3, device)
    wk = w.float().requires_grad_(True)
    with use_backend("triton"), count_launches() as launches:
        out = patch_embed3d(x.float(), wk, visible=visible)
        out.sum().backward()
    ref_w = w.clone().requires_grad_(True)
    ref = conv3d_reference(x, ref_w, None, None, visible)
    ref.sum().backward()
    assert _rel(out, ref) < _tol(torch.float32, device)
    assert _rel(wk.grad, ref_w.grad) < _tol(torch.float32, device)
    assert set(launches) == {"patch_embed3d.forward", "patch_embed3d.grad_weight"}


def test_strided_volume(rng, device):
    # a non-contiguous view: the kernel reads it through its strides, no copy
    inputs, N = _inputs(rng, 2, 2, (4, 8, 8), (2, 4, 4), 16, device)
    x = inputs[0].permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    assert not x.is_contiguous()
    inputs[0] = x
    _check_forward_backward(inputs, _visible(rng, 2, N, 5, device), device)


def test_visible_order_is_kept(rng, device):
    inputs, N = _inputs(rng, 1, 1, (2, 8, 8), (2, 4, 4), 8, device)
    x, w, b, pos = (t.float() for t in inputs)
    with use_backend("triton"):
        full = patch_embed3d(x, w, b, pos)
        picked = patch_embed3d(x, w, b, pos, torch.tensor([[3, 0, 2]], device=device))
    assert torch.equal(picked[0], full[0, [3, 0, 2]])


def test_poisoned_outputs_are_overwritten(rng, device, monkeypatch):
    kernels = _triton()

    def poisoned(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(kernels, "_empty", poisoned)
    inputs, N = _inputs(rng, 2, 2, (5, 8, 8), (2, 4, 4), 20, device)
    _check_forward_backward(inputs, None, device, pad=True)
    _check_forward_backward(inputs, _visible(rng, 2, N, 4, device), device, pad=True)


def test_weight_gradient_split_is_deterministic(rng, device):
    inputs, N = _inputs(rng, 3, 1, (4, 8, 8), (2, 4, 4), 16, device)
    x = inputs[0].float()
    visible = _visible(rng, 3, N, 6, device)
    g = torch.randn(3, 6, 16, device=device)
    kernels = _triton()
    one = kernels.grad_weight_bias(x, g, visible, (16, 1, 2, 4, 4), False, True, split=1)
    three = kernels.grad_weight_bias(x, g, visible, (16, 1, 2, 4, 4), False, True, split=3)
    again = kernels.grad_weight_bias(x, g, visible, (16, 1, 2, 4, 4), False, True, split=3)
    for a, b, c in zip(one, three, again):
        assert torch.equal(b, c)                       # reruns bit-identical (no atomics)
        assert _rel(b, a) < 1e-6


def test_reference_gradcheck(rng):
    inputs, N = _inputs(rng, 2, 2, (2, 4, 4), (1, 2, 2), 5, "cpu")
    visible = _visible(rng, 2, N, 3, "cpu")
    args = [t.requires_grad_(True) for t in inputs]
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: patch_embed3d(*a, visible), args)
        assert torch.autograd.gradcheck(lambda *a: patch_embed3d(*a, pad=True), args)


def test_visible_sets_are_checked(rng, device):
    inputs, N = _inputs(rng, 2, 1, (2, 8, 8), (2, 4, 4), 8, device)
    x, w, b, pos = (t.float() for t in inputs)
    for name in ("triton", "reference"):
        with use_backend(name):
            with pytest.raises(ValueError, match="repeats a token index"):
                patch_embed3d(x, w, b, pos, torch.tensor([[0, 1], [2, 2]], device=device))
            with pytest.raises(ValueError, match="outside"):
                patch_embed3d(x, w, b, pos, torch.tensor([[0, 1], [2, N]], device=device))
            with pytest.raises(ValueError, match="outside"):
                patch_embed3d(x, w, b, pos, torch.tensor([[0, -1], [2, 3]], device=device))
    with pytest.raises(ValueError, match="only"):
        patch_embed3d(x, w, visible=torch.zeros(2, N + 1, dtype=torch.long, device=device))
    # unchecked out-of-range indices never touch memory out of bounds, forward or backward: their
    # rows are the bias alone, and they add nothing to any gradient
    xs, ws, bs, ps = (t.clone().requires_grad_() for t in (x, w, b, pos))
    with use_backend("triton"):
        out = patch_embed3d(xs, ws, bs, ps, torch.tensor([[0, 10**6], [2, -5]], device=device),
                            check_visible=False)
    torch.testing.assert_close(out[:, 1], b.expand(2, -1))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out.backward(grad_out)
    ref = [t.clone().requires_grad_() for t in (x, w, b, pos)]
    valid = patch_embed3d_reference(*ref, torch.tensor([[0], [2]], device=device))
    (valid * grad_out[:, :1]).sum().backward()
    for got, want in zip((xs, ws, bs, ps), ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_bad_input(device):
    x = torch.randn(1, 2, 4, 8, 8, device=device)
    w = torch.randn(8, 2, 2, 4, 4, device=device)
    with pytest.raises(ValueError, match="volume must have 5 dimensions"):
        patch_embed3d(x[0], w)
    with pytest.raises(ValueError, match="weight must have 5 dimensions"):
        patch_embed3d(x, w[0])
    with pytest.raises(ValueError, match="input channels"):
        patch_embed3d(x, torch.randn(8, 3, 2, 4, 4, device=device))
    with pytest.raises(ValueError, match="bias must have shape"):
        patch_embed3d(x, w, torch.zeros(7, device=device))
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(8, 8\)"):
        patch_embed3d(x, w, None, torch.zeros(9, 8, device=device))
    with pytest.raises(TypeError, match="visible must have dtype"):
        patch_embed3d(x, w, visible=torch.zeros(1, 2, device=device))
    with pytest.raises(ValueError, match=r"visible must have shape \(1, \*\)"):
        patch_embed3d(x, w, visible=torch.zeros(2, 2, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="weight has dtype"):
        patch_embed3d(x, w.half())
    with pytest.raises(TypeError, match="volume must have dtype"):
        patch_embed3d(x.long(), w)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        patch_embed3d(x, w.tolist())


def test_model_trains_under_compile_and_autocast(rng, device):
    """A tiny model on the op: torch.compile (fullgraph) + autocast, kernels forced; it learns."""
    torch.manual_seed(0)
    from lungcore.nn import PatchEmbed3d

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = PatchEmbed3d(1, 16, (2, 4, 4), (4, 8, 8))
            self.head = torch.nn.Linear(16, 1)

        def forward(self, x, visible):
            return self.head(self.embed(x, visible).mean(1)).squeeze(1)

    model = Tiny().to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 1, 4, 8, 8, device=device)
    target = x.mean(dim=(1, 2, 3, 4)) * 10
    visible = _visible(rng, 4, 8, 4, device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    losses = []
    with use_backend("triton"), count_launches() as launches:
        for _ in range(6):
            with torch.autocast(device, dtype=amp_dtype):
                loss = F.mse_loss(compiled(x, visible).float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.autocast(device, dtype=amp_dtype):
            eager = model(x, visible)
            fused = compiled(x, visible)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert torch.allclose(eager.float(), fused.float(), rtol=1e-2, atol=1e-2)
    assert launches["patch_embed3d.forward"] >= 6 and launches["patch_embed3d.grad_weight"] == 6
    assert launches["patch_embed3d.grad_pos"] == 6


@pytest.mark.parametrize("with_visible", [False, True])
def test_registered_op_passes_opcheck(rng, device, with_visible):
    """The custom op (what torch.compile sees): schema, fake tensors, autograd registration."""
    from lungcore.ops.patch_embed import _patch_embed3d_op

    inputs, N = _inputs(rng, 2, 1, (2, 8, 8), (2, 4, 4), 8, device)
    x, w, b, pos = (t.float().requires_grad_(True) for t in inputs)
    visible = _visible(rng, 2, N, 2, device) if with_visible else None
    with use_backend("triton"), count_launches() as launches:
        torch.library.opcheck(_patch_embed3d_op, (x, w, b, pos, visible, False, True))
        out = _patch_embed3d_op(x, w, b, pos, visible, False, True)
        out.sum().backward()
    assert launches["patch_embed3d.grad_weight"] >= 1 and launches["patch_embed3d.grad_volume"] >= 1
    ref_in = [t.detach().double().requires_grad_(True) for t in (x, w, b, pos)]
    ref = conv3d_reference(*ref_in, visible)
    ref.sum().backward()
    assert _rel(out, ref) < _tol(torch.float32, device)
    for k, r in zip((x, w, b, pos), ref_in):
        assert _rel(k.grad, r.grad) < _tol(torch.float32, device)


def test_strided_visible_and_empty_visible(rng, device):
    inputs, N = _inputs(rng, 2, 1, (4, 8, 8), (2, 4, 4), 16, device)
    order = torch.rand(2, N, device=device).argsort(dim=1)
    visible = order[:, :3]                       # a non-contiguous view, as MAE masking makes it
    assert not visible.is_contiguous()
    _check_forward_backward(inputs, visible, device)
    x, w, b, pos = (t.float().requires_grad_(True) for t in inputs)
    with use_backend("triton"):
        out = patch_embed3d(x, w, b, pos, order[:, :0])
        assert out.shape == (2, 0, 16)
        out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(pos.grad, torch.zeros_like(pos))
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_network_a_shape_on_gpu(rng, dtype):
    """Network A's full shape (B=16, 1x32x128x128, patch 4x16x16, E=256, mask ratio 0.75) on a GPU."""
    inputs, N = _inputs(rng, 16, 1, (32, 128, 128), (4, 16, 16), 256, "cuda")
    assert N == 512
    _check_forward_backward(inputs, _visible(rng, 16, N, 128, "cuda"), "cuda", dtype, need_volume=False)
    _check_forward_backward(inputs, None, "cuda", dtype, need_volume=False)


def test_each_backend_runs_what_it_names(monkeypatch):
    """reference -> patch_embed3d_reference; torch -> Conv3d (CPU, every token, no gradient recorded;
    else the reference); triton -> the kernels, which refuse float64 with a clear error instead of
    silently running something else."""
    import lungcore.ops.patch_embed as module

    calls = []
    real = module.patch_embed3d_reference
    monkeypatch.setattr(module, "patch_embed3d_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = torch.randn(1, 1, 4, 8, 8), torch.randn(4, 1, 2, 4, 4)
    with use_backend("reference"):
        ref = patch_embed3d(x, w)
    assert calls == [1]
    with use_backend("torch"), count_launches() as launches:
        fast = patch_embed3d(x, w)
    assert calls == [1] and not launches
    assert _rel(fast, ref) < tolerance(torch.float32)
    # training (a gradient recorded): the gather-first GEMM, whose CPU backward beats Conv3d's
    with use_backend("torch"):
        trained = patch_embed3d(x, w.clone().requires_grad_(True))
    assert calls == [1, 1] and trained.requires_grad
    with use_backend("torch"), torch.no_grad():
        patch_embed3d(x, w.clone().requires_grad_(True))
    assert calls == [1, 1]
    with use_backend("triton"), pytest.raises(TypeError, match="float64"):
        patch_embed3d(x.double(), w.double())
