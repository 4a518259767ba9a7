"""3D patch embedding with visible-token gather: ``patch_embed3d``.

A volume (B, C, D, H, W) is cut into non-overlapping patches of ``weight.shape[2:]`` = (pd, ph, pw);
each patch is projected by ``weight`` (E, C, pd, ph, pw) (Conv3d's layout), ``bias`` (E,) and the
position embedding row of its token are added, and only the tokens listed in ``visible`` (B, T) are
produced (MAE-style masked pretraining pays only for the visible patches).

Conventions (the same as ``Conv3d(C, E, kernel_size=p, stride=p)(x).flatten(2).transpose(1, 2)``):
tokens are numbered depth-major, n = (d * nH + h) * nW + w, so weights and position embeddings port
to and from MONAI's ``PatchEmbeddingBlock`` and plain ``Conv3d`` unchanged.

Decisions:
* ``visible`` holds token indices in [0, N) and must not repeat an index within a row (a visible
  *set*; MAE masks never repeat). Repeats and out-of-range indices raise ``ValueError`` (the check
  costs one device sync; ``check_visible=False`` skips it when the caller guarantees valid sets;
  out-of-range indices are then masked in the kernels, never read or written out of bounds: on
  ``triton`` their rows hold the bias alone and add nothing to any gradient).
  Rows need not be sorted; the output follows the order of ``visible``.
* A spatial size that is not a multiple of the patch raises ``ValueError`` unless ``pad=True``,
  which zero-pads at the high end of each axis (like ``F.pad(x, (0, pw', 0, ph', 0, pd'))``); the
  kernels pad with load masks, never with a copy.
* Inputs share one floating dtype (fp32/fp16/bf16 on every backend; float64 on ``torch`` and
  ``reference`` only: with Triton chosen it raises ``TypeError``); under ``torch.autocast`` they are
  cast to the autocast dtype first. Kernels accumulate in fp32. The Triton backward is
  deterministic (no atomics): the weight gradient sums fixed split-M partials in a fixed order.

Backends (``lungcore.backend``, op ``"patch_embed3d"``): ``triton`` (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``) behind the registered op ``lungcore::patch_embed3d`` and its registered
backward op (one opaque differentiable op for torch.compile and autocast, eager and compiled);
``torch`` (the CPU default: oneDNN's strided Conv3d for all tokens when no gradient is recorded,
else the gather-first path, plain autograd: Conv3d's CPU backward is the slow one); ``reference``
(:func:`patch_embed3d_reference`, the oracle).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from lungcore import checks
from lungcore.backend import backend_for, register_op

OP = "patch_embed3d"
register_op(OP, ("triton", "torch"), preference={"cuda": ("triton", "torch", "reference"),
                                            "cpu": ("torch", "reference")})

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: not on Triton
INDEX_DTYPES = (torch.int32, torch.int64)

_kernels = None


def _triton():
    global _kernels
    if _kernels is None:
        from lungcore.triton_kernels import patch_embed as module

        _kernels = module
    return _kernels


def token_grid(spatial: tuple[int, int, int] | torch.Size, patch: tuple[int, int, int],
               pad: bool = False) -> tuple[int, int, int]:
    """Token grid (nD, nH, nW) of a (D, H, W) volume cut into ``patch``; ceil when ``pad``.

    Example:
        >>> token_grid((32, 128, 128), (4, 16, 16))
        (8, 8, 8)
    """
    spatial = tuple(int(s) for s in spatial)
    patch = tuple(int(p) for p in patch)
    if not pad and any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(
            f"volume spatial size {spatial} is not a multiple of the patch size {patch}; "
            "crop or resample the volume, or pass pad=True to zero-pad its high end")
    return tuple(-(-s // p) for s, p in zip(spatial, patch))


# ----------------------------------------------------------------------------------------------
# reference (the oracle; also the CPU path)
# ----------------------------------------------------------------------------------------------
def patch_embed3d_reference(volume: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            pos_embed: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                            pad: bool = False) -> torch.Tensor:
    """Gather-first patch embedding in plain PyTorch (reshape/permute, gather, linear, add).

    Precision follows :func:`patch_embed3d` and its kernels: the output dtype is the autocast dtype
    when ``torch.autocast`` is on for the volume's device (every input is rounded to it first, as the
    op casts its inputs), else the volume's dtype (the other inputs are cast to it); the GEMM, bias
    and position add run in fp32 (float64 for float64) and the sum is rounded once to the output
    dtype, as the forward kernel's fp32 accumulator and epilogue do. On a GPU a bf16 / fp16 GEMM
    stays in that dtype (tensor cores, fp32 accumulation inside; an fp32 GEMM there would be several
    times slower for the ``torch`` backend): its product is rounded once more before the fp32 add.

    Example:
        >>> x = torch.randn(2, 1, 8, 8, 8); w = torch.randn(16, 1, 4, 4, 4)
        >>> patch_embed3d_reference(x, w).shape
        torch.Size([2, 8, 16])
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     patch_embed3d_reference(x, w, pos_embed=torch.randn(8, 16)).dtype
        torch.bfloat16
    """
    device_type = volume.device.type
    autocast = torch.is_autocast_enabled(device_type)
    out_dtype = torch.get_autocast_dtype(device_type) if autocast else volume.dtype
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32

    def rounded(t: torch.Tensor | None) -> torch.Tensor | None:
        # rounded to the output dtype as the op's inputs are, then widened (no copy for fp32 / fp64)
        return None if t is None else t.to(out_dtype).to(acc_dtype)

    E = weight.shape[0]
    pd, ph, pw = (int(s) for s in weight.shape[2:])
    patches = _patches(volume, (pd, ph, pw), pad)
    if visible is not None:
        patches = torch.gather(patches, 1, visible.long()[:, :, None].expand(-1, -1, patches.shape[2]))
    if pos_embed is not None and visible is not None:
        pos_embed = pos_embed[visible.long()]
    # autocast off inside: it would otherwise round the widened GEMM operands back to its dtype
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if device_type == "cpu" or out_dtype in (torch.float32, torch.float64):
            out = F.linear(rounded(patches), rounded(weight).reshape(E, -1), rounded(bias))
        else:
            out = F.linear(patches.to(out_dtype), weight.to(out_dtype).reshape(E, -1)).to(acc_dtype)
            out = out if bias is None else out + rounded(bias)
        if pos_embed is not None:
            out = out + rounded(pos_embed)
    return out.to(out_dtype)


def _patches(volume: torch.Tensor, patch: tuple[int, int, int], pad: bool) -> torch.Tensor:
    """(B, N, K) patch matrix of the (zero-padded when ``pad``) volume: the reference's A operand."""
    B, C, D, H, W = volume.shape
    pd, ph, pw = patch
    nD, nH, nW = token_grid((D, H, W), patch, pad)
    if pad:
        volume = F.pad(volume, (0, nW * pw - W, 0, nH * ph - H, 0, nD * pd - D))
    return (volume.reshape(B, C, nD, pd, nH, ph, nW, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
            .reshape(B, nD * nH * nW, C * pd * ph * pw))


def check_visible_set(visible: torch.Tensor, num_tokens: int) -> None:
    """``ValueError`` when a row of ``visible`` repeats an index or leaves [0, num_tokens) (one sync)."""
    if visible.numel() == 0:
        return
    v = visible.long()
    out_of_range = (v < 0) | (v >= num_tokens)
    ordered = torch.sort(v, dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) if v.shape[1] > 1 else out_of_range[:, :0]
    flags = torch.stack([out_of_range.any(), repeated.any()]).tolist()
    if flags[0]:
        bad = v[out_of_range][0].item()
        raise ValueError(f"visible holds token index {bad} outside [0, {num_tokens}) (N = number of patches)")
    if flags[1]:
        row = int(repeated.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"visible row {row} repeats a token index: visible must list distinct tokens per row")


# ----------------------------------------------------------------------------------------------
# the registered op (what torch.compile sees: one opaque differentiable op) and its autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lungcore::patch_embed3d", mutates_args=())
def _patch_embed3d_op(volume: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      pos_embed: Optional[torch.Tensor], visible: Optional[torch.Tensor], pad: bool,
                      check_visible: bool) -> torch.Tensor:
    if visible is not None and check_visible:
        nD, nH, nW = token_grid(volume.shape[2:], tuple(weight.shape[2:]), pad)
        check_visible_set(visible, nD * nH * nW)
    return _triton().forward(volume, weight, bias, pos_embed, visible, pad)


@_patch_embed3d_op.register_fake
def _(volume, weight, bias, pos_embed, visible, pad, check_visible):
    nD, nH, nW = token_grid(volume.shape[2:], tuple(weight.shape[2:]), pad)
    T = nD * nH * nW if visible is None else visible.shape[1]
    return volume.new_empty((volume.shape[0], T, weight.shape[0]))


@torch.library.custom_op("lungcore::patch_embed3d_backward", mutates_args=())
def _patch_embed3d_backward_op(grad_out: torch.Tensor, volume: torch.Tensor, weight: torch.Tensor,
                               visible: Optional[torch.Tensor], pad: bool, need_volume: bool,
                               need_weight: bool, need_bias: bool, need_pos: bool) -> list[torch.Tensor]:
    """[d_volume, d_weight, d_bias, d_pos] from the Triton kernels; a gradient not needed is an empty tensor."""
    kernels = _triton()
    g = grad_out.contiguous()
    grads = [None, None, None, None]
    if need_volume:
        grads[0] = kernels.grad_volume(g, weight, visible, tuple(volume.shape), pad)
    if need_weight or need_bias:
        dw32, db32 = kernels.grad_weight_bias(volume, g, visible, tuple(weight.shape), pad, need_bias)
        grads[1] = dw32.to(weight.dtype) if need_weight else None
        grads[2] = db32.to(weight.dtype) if need_bias else None
    if need_pos:
        nD, nH, nW = token_grid(volume.shape[2:], tuple(weight.shape[2:]), pad)
        grads[3] = kernels.grad_pos(g, visible, nD * nH * nW, weight.dtype)
    # outputs of a custom op must not alias each other: a fresh empty tensor per missing gradient
    return [g if g is not None else grad_out.new_empty(0) for g in grads]


@_patch_embed3d_backward_op.register_fake
def _(grad_out, volume, weight, visible, pad, need_volume, need_weight, need_bias, need_pos):
    nD, nH, nW = token_grid(volume.shape[2:], tuple(weight.shape[2:]), pad)
    E = weight.shape[0]
    return [volume.new_empty(volume.shape) if need_volume else grad_out.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else grad_out.new_empty(0),
            weight.new_empty((E,)) if need_bias else grad_out.new_empty(0),
            weight.new_empty((nD * nH * nW, E)) if need_pos else grad_out.new_empty(0)]


def _setup_context(ctx, inputs, output):
    volume, weight, bias, pos_embed, visible, pad, check_visible = inputs
    ctx.save_for_backward(volume, weight, visible)
    ctx.pad = pad
    ctx.has_bias = bias is not None
    ctx.has_pos = pos_embed is not None


def _backward(ctx, grad_out):
    volume, weight, visible = ctx.saved_tensors
    need_volume, need_weight, need_bias, need_pos = (bool(n) for n in ctx.needs_input_grad[:4])
    needs = (need_volume, need_weight, need_bias and ctx.has_bias, need_pos and ctx.has_pos)
    if not any(needs):
        return None, None, None, None, None, None, None
    grads = _patch_embed3d_backward_op(grad_out, volume, weight, visible, ctx.pad, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


_patch_embed3d_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------
def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Autograd will record an op on ``tensors``: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def patch_embed3d(volume: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  pos_embed: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                  *, pad: bool = False, check_visible: bool = True) -> torch.Tensor:
    """Patch tokens of a 3D volume: patchify + linear + bias + position embedding + visible gather.

    Args:
        volume: (B, C, D, H, W) float32/float16/bfloat16 (float64 not on Triton), any strides.
        weight: (E, C, pd, ph, pw), Conv3d's layout; the patch size is ``weight.shape[2:]``.
        bias: optional (E,).
        pos_embed: optional (N, E) added per token index, N = (D/pd)*(H/ph)*(W/pw).
        visible: optional (B, T) int32/int64 token indices (distinct per row, any order): only
            these tokens are computed, in this order. Tokens are numbered depth-major like
            ``Conv3d(...).flatten(2)``.
        pad: zero-pad the high end of each axis to a multiple of the patch (else a size that is
            not a multiple raises ``ValueError``).
        check_visible: validate ``visible`` (range, no repeats; one device sync).

    Returns:
        (B, N, E) tokens, or (B, T, E) with ``visible``; the inputs' dtype (fp32 accumulation).

    Example:
        >>> import torch
        >>> from lungcore.ops import patch_embed3d
        >>> ct = torch.randn(2, 1, 32, 128, 128)
        >>> w, b, pos = torch.randn(256, 1, 4, 16, 16) * 0.02, torch.zeros(256), torch.zeros(512, 256)
        >>> keep = torch.rand(2, 512).argsort(dim=1)[:, :128]        # mask ratio 0.75
        >>> patch_embed3d(ct, w, b, pos, keep).shape
        torch.Size([2, 128, 256])
    """
    checks.tensor("volume", volume, ndim=5, dtypes=FLOAT_DTYPES)
    checks.tensor("weight", weight, ndim=5, dtypes=FLOAT_DTYPES, device=volume.device)
    B, C = volume.shape[:2]
    E = weight.shape[0]
    patch = tuple(int(s) for s in weight.shape[2:])
    if weight.shape[1] != C:
        raise ValueError(f"weight has {weight.shape[1]} input channels (shape {tuple(weight.shape)}) "
                         f"but volume has {C} (shape {tuple(volume.shape)})")
    if min(patch) < 1 or E < 1:
        raise ValueError(f"weight must have E >= 1 and a patch size >= 1 on every axis, got shape {tuple(weight.shape)}")
    nD, nH, nW = token_grid(volume.shape[2:], patch, pad)
    N = nD * nH * nW
    if bias is not None:
        checks.tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=volume.device)
        checks.shape("bias", bias, (E,))
    if pos_embed is not None:
        checks.tensor("pos_embed", pos_embed, ndim=2, dtypes=FLOAT_DTYPES, device=volume.device)
        checks.shape("pos_embed", pos_embed, (N, E))
    if visible is not None:
        checks.tensor("visible", visible, ndim=2, dtypes=INDEX_DTYPES, device=volume.device)
        checks.shape("visible", visible, (B, None))
        if visible.shape[1] > N:
            raise ValueError(f"visible lists {visible.shape[1]} tokens per row but the volume has only "
                             f"N = {N} patches (indices must be distinct)")
    device_type = volume.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        volume, weight = volume.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        pos_embed = pos_embed.to(dtype) if pos_embed is not None else None
    else:
        for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
            if t is not None and t.dtype != volume.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but volume has {volume.dtype}: "
                                "the inputs must share one dtype (or run under torch.autocast)")
    which = backend_for(OP, volume.device)
    if which == "triton":
        if volume.dtype == torch.float64:
            raise TypeError("volume: the Triton kernels take float32, float16 or bfloat16, got torch.float64 "
                            "(use the 'torch' or 'reference' backend for float64, e.g. for gradcheck)")
        return _patch_embed3d_op(volume, weight, bias, pos_embed, visible, bool(pad), bool(check_visible))
    if visible is not None and check_visible and not torch.compiler.is_compiling():
        check_visible_set(visible, N)
    if which == "torch" and visible is None and not pad and volume.device.type == "cpu" \
            and not _needs_grad(volume, weight, bias, pos_embed):
        # every token, inference: oneDNN's strided Conv3d beats reshape/permute + linear forward by up to
        # ~1.6x on CPU (benchmarks/bench_patch_embed.py); its backward does not: 5x slower at the demo's
        # CMML shape, 6x at patch 8x8x8 (1 thread, AMD EPYC, 2026-12-07), so training takes the GEMM.
        # cuDNN is the slow one on GPUs, not this
        out = F.conv3d(volume, weight, bias, stride=patch).flatten(2).transpose(1, 2)
        return out if pos_embed is None else out + pos_embed
    return patch_embed3d_reference(volume, weight, bias, pos_embed, visible, pad)
