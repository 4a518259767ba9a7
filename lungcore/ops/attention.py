"""Masked cross-attention: ``softmax(scale * q k^T, masked) v`` with NaN-free fully masked rows.

Public function :func:`masked_cross_attention`; the float64-friendly oracle
:func:`masked_cross_attention_reference` beside it.

Dispatch (``lungcore.backend``, op name ``"masked_cross_attention"``):
    ``triton``     CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``): the flash-style
                   kernels of ``lungcore.triton_kernels.attention`` behind two registered ops,
                   ``lungcore::masked_cross_attention_fwd`` / ``..._bwd`` (one opaque
                   differentiable op for torch.compile and autocast). float32/16/bf16 only.
    ``torch``      CPU tensors by default: ``F.scaled_dot_product_attention`` with the boolean
                   mask. It was about 1.5-7x faster than the materialised reference on 2 shared
                   CPU cores at our network shapes, forward and backward (benchmarks/bench_attention.py).
                   SDPA is an aten op that torch.compile and autocast already understand, so no
                   wrapper op is needed. Rows whose keys are all masked are given an all-True mask
                   before SDPA and zeroed after it, so they are finite (and have zero gradient) on
                   every torch version.
    ``reference``  :func:`masked_cross_attention_reference` (the oracle; forced only).

Semantics (all backends): a query row whose keys are all masked, or which ``query_mask`` marks
False, outputs zeros and passes zero gradient to q, k and v. Dropout (``dropout_p > 0``) is
applied to the attention probabilities after normalisation, as in SDPA: in-kernel (Philox,
seeded per call) on the Triton path, torch's dropout on the CPU path; the two paths therefore
draw different masks for the same torch seed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lungcore import checks
from lungcore.backend import backend_for, register_op

OP = "masked_cross_attention"
register_op(OP, ("triton", "torch"), preference={"cuda": ("triton", "torch", "reference"), "cpu": ("torch", "reference")})

MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: torch/reference only


# --------------------------------------------------------------------------------- reference
def masked_cross_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None,
                                     query_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                                     dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Plain-PyTorch oracle (materialises the L x L matrix; computes in q's dtype).

    ``dropout_mask`` (bool, broadcastable to (..., Lq, Lk), True = keep) applies a given
    dropout pattern scaled by 1 / (1 - dropout_p), so tests can replay a kernel's mask.
    Fully masked rows: masked scores are set to the dtype's most negative finite value, the
    softmax is multiplied by the mask, so those rows are exactly zero with zero gradient.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
        >>> k, v = torch.randn(1, 2, 4, 8, dtype=torch.float64), torch.randn(1, 2, 4, 8, dtype=torch.float64)
        >>> key_mask, query_mask = torch.tensor([[True, True, False, False]]), torch.tensor([[True, False, True]])
        >>> ref = masked_cross_attention_reference(q, k, v, key_mask, query_mask)
        >>> ref.shape, bool(ref[0, :, 1].abs().max() == 0)     # query 1 is masked: zeros
        (torch.Size([1, 2, 3, 8]), True)
        >>> fast = masked_cross_attention(q, k, v, key_mask=key_mask, query_mask=query_mask)
        >>> torch.allclose(ref, fast)                          # the oracle of the public function
        True
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        m = key_mask[..., None, None, :]
        s = s.masked_fill(~m, torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1) * m
    else:
        p = torch.softmax(s, dim=-1)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(p, v)
    if query_mask is not None:
        out = out * query_mask[..., None, :, None]
    return out


def _sdpa_path(q, k, v, key_mask, query_mask, scale, dropout_p):
    attn_mask = None
    alive = query_mask
    if key_mask is not None:
        has_key = key_mask.any(dim=-1, keepdim=True)
        # eager: skip the dead-row repair when every row has a key (a free check on CPU);
        # traced (torch.compile): always repair, no data-dependent branch
        if torch.compiler.is_compiling() or not bool(has_key.all()):
            # dead rows attend to everything (finite), then get zeroed: no NaN on any torch version
            key_mask = key_mask | ~has_key
            alive = has_key if alive is None else alive & has_key
        attn_mask = key_mask[..., None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if alive is not None:
        out = out * alive[..., None, :, None].to(out.dtype)
    return out


# -------------------------------------------------------------------------- Triton custom ops
def _to5(t: Tensor) -> Tensor:
    return t if t.dim() == 5 else t.unsqueeze(1)


def _alloc_out(q: Tensor) -> Tensor:
    # (B0, B1, Lq, H, D) memory, (B0, B1, H, Lq, D) view: a module's head merge is then free
    b0, b1, h, lq, d = q.shape
    return torch.empty((b0, b1, lq, h, d), dtype=q.dtype, device=q.device).transpose(2, 3)


@torch.library.custom_op("lungcore::masked_cross_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], query_mask: Optional[Tensor],
            seed: Optional[Tensor], scale: float, dropout_p: float) -> tuple[Tensor, Tensor]:
    from lungcore.triton_kernels import attention as kernels

    out = _alloc_out(q)
    lse = torch.empty(q.shape[:4], dtype=torch.float32, device=q.device)
    kernels.attention_forward(q, k, v, key_mask, query_mask, out, lse, seed if seed is not None else lse,
                              scale, dropout_p)
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, key_mask, query_mask, seed, scale, dropout_p):
    return _alloc_out(q), q.new_empty(q.shape[:4], dtype=torch.float32)


@torch.library.custom_op("lungcore::masked_cross_attention_bwd", mutates_args=())
def _bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            key_mask: Optional[Tensor], query_mask: Optional[Tensor], seed: Optional[Tensor],
            scale: float, dropout_p: float) -> tuple[Tensor, Tensor, Tensor]:
    from lungcore.triton_kernels import attention as kernels

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    kernels.attention_backward(grad_out, q, k, v, out, lse, key_mask, query_mask,
                               seed if seed is not None else lse, dq, dk, dv, delta, scale, dropout_p)
    return dq, dk, dv


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, key_mask, query_mask, seed, scale, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, query_mask, seed, scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, query_mask, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_mask, query_mask, seed = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, key_mask, query_mask, seed, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public function
def _check_mask(name: str, mask: Optional[Tensor], batch: tuple[int, ...], length: int,
                device: torch.device) -> Optional[Tensor]:
    if mask is None:
        return None
    checks.tensor(name, mask, dtypes=(torch.bool,), device=device)
    target = (*batch, length)
    try:
        return mask.expand(target)
    except RuntimeError:
        want = "(" + ", ".join(str(s) for s in target) + ")"
        raise ValueError(f"{name} must have shape {want} (or broadcast to it), got {tuple(mask.shape)}") from None


def masked_cross_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None,
                           query_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                           dropout_p: float = 0.0) -> Tensor:
    """Masked (cross-)attention ``softmax(scale * q @ k^T) @ v`` over the keys ``key_mask`` keeps.

    Args:
        q: (B, H, Lq, D) or (B0, B1, H, Lq, D) queries; float32, float16 or bfloat16 (float64 on
            the CPU path only, e.g. for gradcheck); D <= 128.
            Any strides (views sliced from a packed projection, groups folded into the batch
            with a second batch axis) are read in place by the Triton kernels.
        k, v: (B, H, Lk, D) or (B0, B1, H, Lk, D), same dtype and device as q. Lq != Lk allowed.
        key_mask: bool, (B, Lk) or (B0, B1, Lk) or anything broadcastable to it; True = attend.
        query_mask: bool, (B, Lq) (same rules); False rows output zeros.
        scale: logit scale, default 1 / sqrt(D).
        dropout_p: dropout on the attention probabilities (pass 0.0 at evaluation).

    Returns:
        (B, H, Lq, D) (or 5-D), dtype of q. Rows with no attended key or ``query_mask`` False are
        zero, with zero gradient. Accumulation is fp32 on the Triton path. In fp16/bf16 the
        backward takes delta = rowsum(dO * O) from the stored fp16/bf16 output, as FlashAttention-2
        does, so a near one-hot softmax loses digits in dq and dk: in bf16 (interpreter, D = 16)
        relative error 4e-3 at logit SD 1, 1.7e-2 at SD 9, 3e-2 at SD 25 (SDPA's CPU math path:
        7e-3 there); fp16 stays within 3e-3 at SD 25.

    Example:
        >>> import torch
        >>> from lungcore.ops import masked_cross_attention
        >>> q, k, v = torch.randn(2, 4, 7, 32), torch.randn(2, 4, 5, 32), torch.randn(2, 4, 5, 32)
        >>> key_mask = torch.tensor([[True, True, False, True, False], [False] * 5])
        >>> out = masked_cross_attention(q, k, v, key_mask=key_mask)
        >>> out.shape, bool(out[1].abs().max() == 0)
        (torch.Size([2, 4, 7, 32]), True)
    """
    checks.tensor("q", q, ndim=(4, 5), dtypes=_DTYPES)
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), checks.tensor("k", k).to(dtype), checks.tensor("v", v).to(dtype)
    checks.tensor("k", k, ndim=q.dim(), dtypes=(q.dtype,), device=q.device)
    checks.tensor("v", v, ndim=q.dim(), dtypes=(q.dtype,), device=q.device)
    *batch, heads, lq, d = q.shape
    batch = tuple(batch)
    lk = k.shape[-2]
    checks.shape("k", k, (*batch, heads, None, d))
    checks.shape("v", v, (*batch, heads, lk, d))
    if d > MAX_HEAD_DIM or d < 1:
        raise ValueError(f"q: head dim (last axis) must be in [1, {MAX_HEAD_DIM}], got {d}")
    key_mask = _check_mask("key_mask", key_mask, batch, lk, q.device)
    query_mask = _check_mask("query_mask", query_mask, batch, lq, q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    scale, dropout_p = float(scale), float(dropout_p)

    which = backend_for(OP, q.device)
    if which == "torch":
        return _sdpa_path(q, k, v, key_mask, query_mask, scale, dropout_p)
    if which == "reference":
        keep = None
        if dropout_p > 0:
            keep = torch.rand((*q.shape[:-1], lk), device=q.device) >= dropout_p
        return masked_cross_attention_reference(q, k, v, key_mask, query_mask, scale, keep, dropout_p)
    if q.dtype == torch.float64:
        raise TypeError("q: the Triton kernels take float32, float16 or bfloat16, got torch.float64 "
                        "(use the 'torch' or 'reference' backend for float64)")
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=q.device)
    km = key_mask if key_mask is None or q.dim() == 5 else key_mask.unsqueeze(1)
    qm = query_mask if query_mask is None or q.dim() == 5 else query_mask.unsqueeze(1)
    out, _ = _fwd_op(_to5(q), _to5(k), _to5(v), km, qm, seed, scale, dropout_p)
    return out if q.dim() == 5 else out.squeeze(1)


__all__ = ["masked_cross_attention", "masked_cross_attention_reference", "MAX_HEAD_DIM"]
