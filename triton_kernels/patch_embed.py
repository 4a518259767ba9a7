"""Fused 3D patch embedding: patchify + linear + bias + position embedding + visible-token gather.

What it computes. A volume (B, C, D, H, W) cut into non-overlapping patches (PD, PH, PW) gives
N = nD*nH*nW tokens numbered depth-major like ``Conv3d(stride=kernel)(x).flatten(2)``; token n of
batch b is the row A[b, n, :] of K = C*PD*PH*PW voxels in (c, i, j, l) order (Conv3d's weight
layout). With ``visible`` (B, T) token indices, output row (b, t) embeds token n = visible[b, t]:

    out[b, t, :] = A[b, n, :] @ W^T + bias + pos[n, :]          (W = weight.reshape(E, K))

The forward is one GEMM (M = B*T rows, E columns, K reduction) whose A tile is *gathered from the
strided volume* (row offset from (b, n), column offset from (c, i, j, l)): the (B, N, K) patch
tensor is never materialised, masked patches are never read, and the epilogue adds bias and the
gathered position rows before one store. Backward:
  * ``_grad_weight_kernel``: dW = dOut^T @ A (A re-gathered from the volume), split over M into
    fp32 partials that the launcher sums in a fixed order (deterministic, no atomics); the
    programs of the first K tile then reduce dOut over their rows for the bias gradient.
  * ``_grad_pos_kernel``: dPos[n] = sum_b dOut[b, inv[b, n]] with inv the inverse of ``visible``
    (duplicate-free, so no atomics), or sum_b dOut[b, n] without ``visible``.
  * ``_grad_volume_kernel``: dA = dOut @ W scattered straight into the volume gradient (patches
    do not overlap and visible sets are duplicate-free, so every voxel has one writer).

Memory traffic (forward): reads B*T*K volume voxels (only the visible patches), E*K weights per
M tile, T*E position rows; writes B*T*E once. No intermediate tensors.

Limits: fp32/fp16/bf16 inputs of one dtype, fp32 accumulation (tf32 ``tl.dot`` for fp32 on GPU);
any strides for the volume; ``visible`` int32/int64 without duplicates per row (the caller
checks); out-of-range indices are masked (never read or written out of bounds). Zero padding of
volumes whose size is not a multiple of the patch is done by load masks (PAD), never by a copy.
Under TRITON_INTERPRET=1 tiles are cast to fp32 before ``tl.dot`` (bf16 dot is wrong there) and
one autotune config is used.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lungcore.triton_kernels._launch import FP_FUSION, multiprocessors, record


def _empty(shape, device, dtype) -> torch.Tensor:
    """Allocation of every buffer a kernel writes in full (tests replace it to poison outputs)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(gpu: list[tuple[int, ...]], interp: tuple[int, ...], names: tuple[str, ...]) -> list[triton.Config]:
    """Autotune configs: (block sizes..., num_warps, num_stages); one config when interpreting."""
    chosen = [interp] if _interpreting() else gpu
    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in chosen]


@triton.jit
def _token_rows(vis_ptr, m, M, T, N, nH, nW, stride_vb, stride_vt,
                stride_b, stride_d, stride_h, stride_w,
                PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, HAS_VIS: tl.constexpr):
    """Per output row m: volume offset of its patch corner, its corner voxel, and validity."""
    b = m // T
    t = m - b * T
    valid = m < M
    if HAS_VIS:
        n = tl.load(vis_ptr + b.to(tl.int64) * stride_vb + t * stride_vt, mask=valid, other=0).to(tl.int32)
        valid = valid & (n >= 0) & (n < N)
        n = tl.where(valid, n, 0)
    else:
        n = t
    nd = n // (nH * nW)
    rem = n - nd * (nH * nW)
    nh = rem // nW
    nw = rem - nh * nW
    d0 = nd * PD
    h0 = nh * PH
    w0 = nw * PW
    off = (b.to(tl.int64) * stride_b + d0.to(tl.int64) * stride_d + h0.to(tl.int64) * stride_h
           + w0.to(tl.int64) * stride_w)
    return off, d0, h0, w0, n, valid


@triton.jit
def _patch_cols(k, KDIM, stride_c, stride_d, stride_h, stride_w,
                PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Per patch column k = ((c*PD + i)*PH + j)*PW + l: volume offset within the patch."""
    l = k % PW
    j = (k // PW) % PH
    i = (k // (PW * PH)) % PD
    c = k // (PW * PH * PD)
    off = c.to(tl.int64) * stride_c + i * stride_d + j * stride_h + l * stride_w
    return off, i, j, l, k < KDIM


@triton.jit
def _load_patches(vol_ptr, row_off, d0, h0, w0, row_ok, k, KDIM, D, H, W,
                  stride_c, stride_d, stride_h, stride_w,
                  PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr):
    """(BLOCK_M, BLOCK_K) tile of A gathered from the volume (zeros outside it when PAD)."""
    col_off, i, j, l, col_ok = _patch_cols(k, KDIM, stride_c, stride_d, stride_h, stride_w, PD, PH, PW)
    mask = row_ok[:, None] & col_ok[None, :]
    if PAD:
        mask = mask & ((d0[:, None] + i[None, :]) < D) & ((h0[:, None] + j[None, :]) < H) \
            & ((w0[:, None] + l[None, :]) < W)
    return tl.load(vol_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0.0), mask


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        gpu=[(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
             (64, 64, 64, 8, 4, 4), (64, 64, 32, 8, 4, 5), (128, 256, 32, 8, 8, 3),
             (32, 64, 64, 8, 4, 4)],
        interp=(32, 32, 32, 1, 4, 1),
        names=("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")),
    key=["M", "E", "KDIM", "PD", "PH", "PW", "HAS_VIS", "PAD"],
)
@triton.jit
def _forward_kernel(vol_ptr, w_ptr, bias_ptr, pos_ptr, vis_ptr, out_ptr,
                    M, E, KDIM, T, N, D, H, W, nH, nW,
                    stride_b, stride_c, stride_d, stride_h, stride_w,
                    stride_vb, stride_vt,
                    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_VIS: tl.constexpr,
                    PAD: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    # grouped program order: consecutive programs share A rows (L2 reuse of the gathered patches)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(E, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    e = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e_ok = e < E
    row_off, d0, h0, w0, n, row_ok = _token_rows(vis_ptr, m, M, T, N, nH, nW, stride_vb, stride_vt,
                                                 stride_b, stride_d, stride_h, stride_w,
                                                 PD, PH, PW, HAS_VIS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        k = tl.multiple_of(k0, BLOCK_K) + tl.arange(0, BLOCK_K)
        a, _ = _load_patches(vol_ptr, row_off, d0, h0, w0, row_ok, k, KDIM, D, H, W,
                             stride_c, stride_d, stride_h, stride_w, PD, PH, PW, PAD)
        # weight is (E, K) row-major: the (BLOCK_K, BLOCK_N) tile is W^T
        wt = tl.load(w_ptr + e[None, :].to(tl.int64) * KDIM + k[:, None],
                     mask=(k[:, None] < KDIM) & e_ok[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), wt.to(tl.float32))
        else:
            acc += tl.dot(a, wt)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + n[:, None].to(tl.int64) * E + e[None, :],
                      mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        acc += pos.to(tl.float32)
    out_mask = (m < M)[:, None] & e_ok[None, :]
    tl.store(out_ptr + m[:, None].to(tl.int64) * E + e[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


# ----------------------------------------------------------------------------------------------
# backward: weight (+ bias)
# ----------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        gpu=[(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
             (128, 128, 32, 8, 4), (64, 64, 128, 4, 3)],
        interp=(32, 32, 32, 4, 1),
        names=("BLOCK_E", "BLOCK_K", "BLOCK_M")),
    key=["M", "E", "KDIM", "PD", "PH", "PW", "HAS_VIS", "PAD", "NEED_BIAS"],
)
@triton.jit
def _grad_weight_kernel(vol_ptr, dout_ptr, vis_ptr, dw_ptr, db_ptr,
                        M, E, KDIM, T, N, D, H, W, nH, nW,
                        stride_b, stride_c, stride_d, stride_h, stride_w,
                        stride_vb, stride_vt,
                        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        HAS_VIS: tl.constexpr, PAD: tl.constexpr, NEED_BIAS: tl.constexpr,
                        DOT_FP32: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    # grid axis 2 splits the M reduction; the launcher sizes it per config (tile count x splits
    # ~ 2 waves), so each program derives its row range from the grid
    pid_e = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    rows_per_split = tl.cdiv(M, tl.num_programs(2))
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    e_ok = e < E
    m_begin = split * rows_per_split
    m_end = min(m_begin + rows_per_split, M)
    acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        row_off, d0, h0, w0, n, row_ok = _token_rows(vis_ptr, m, m_end, T, N, nH, nW, stride_vb, stride_vt,
                                                     stride_b, stride_d, stride_h, stride_w,
                                                     PD, PH, PW, HAS_VIS)
        a, _ = _load_patches(vol_ptr, row_off, d0, h0, w0, row_ok, k, KDIM, D, H, W,
                             stride_c, stride_d, stride_h, stride_w, PD, PH, PW, PAD)
        # dOut^T tile (BLOCK_E, BLOCK_M); rows of invalid tokens contribute nothing
        g = tl.load(dout_ptr + m[None, :].to(tl.int64) * E + e[:, None],
                    mask=row_ok[None, :] & e_ok[:, None], other=0.0)
        if DOT_FP32:
            acc += tl.dot(g.to(tl.float32), a.to(tl.float32))
        else:
            acc += tl.dot(g, a)
    base = split.to(tl.int64) * E * KDIM
    tl.store(dw_ptr + base + e[:, None].to(tl.int64) * KDIM + k[None, :], acc,
             mask=e_ok[:, None] & (k < KDIM)[None, :])
    if NEED_BIAS:
        if pid_k == 0:
            # the bias gradient (a row sum of dOut) is computed only by the programs that store it,
            # in a loop of its own after the GEMM loop (dOut rows are L2-hot), so the pipelined GEMM
            # loop carries no branch and no extra accumulator
            for m0 in range(m_begin, m_end, BLOCK_M):
                m = m0 + tl.arange(0, BLOCK_M)
                row_ok = _token_rows(vis_ptr, m, m_end, T, N, nH, nW, stride_vb, stride_vt,
                                     stride_b, stride_d, stride_h, stride_w, PD, PH, PW, HAS_VIS)[5]
                g = tl.load(dout_ptr + m[None, :].to(tl.int64) * E + e[:, None],
                            mask=row_ok[None, :] & e_ok[:, None], other=0.0)
                acc_b += tl.sum(g.to(tl.float32), axis=1)
            tl.store(db_ptr + split * E + e, acc_b, mask=e_ok)


# ----------------------------------------------------------------------------------------------
# backward: position embedding
# ----------------------------------------------------------------------------------------------
@triton.autotune(
    # small tiles: the grid is (N / BLOCK_T) x (E / BLOCK_E) and each program loops over the batch,
    # so network A (N = 512, E = 256) launches 128-256 programs instead of 32
    configs=_configs(gpu=[(8, 64, 2, 2), (16, 64, 2, 2), (4, 128, 4, 2), (8, 128, 4, 2)], interp=(16, 32, 4, 1),
                     names=("BLOCK_T", "BLOCK_E")),
    key=["B", "N", "E", "HAS_VIS"],
)
@triton.jit
def _grad_pos_kernel(dout_ptr, inv_ptr, dpos_ptr, B, N, E, T,
                     HAS_VIS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n_ok = n < N
    e_ok = e < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for b in range(0, B):
        if HAS_VIS:
            t = tl.load(inv_ptr + b * N + n, mask=n_ok, other=-1)
        else:
            t = n
        ok = n_ok & (t >= 0)
        row = tl.where(ok, t, 0).to(tl.int64) + b * T
        g = tl.load(dout_ptr + row[:, None] * E + e[None, :], mask=ok[:, None] & e_ok[None, :], other=0.0)
        acc += g.to(tl.float32)
    tl.store(dpos_ptr + n[:, None].to(tl.int64) * E + e[None, :], acc.to(dpos_ptr.dtype.element_ty),
             mask=n_ok[:, None] & e_ok[None, :])


# ----------------------------------------------------------------------------------------------
# backward: volume
# ----------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        gpu=[(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
             (64, 64, 32, 4, 5)],
        interp=(32, 32, 32, 4, 1),
        names=("BLOCK_M", "BLOCK_K", "BLOCK_E")),
    key=["M", "E", "KDIM", "PD", "PH", "PW", "HAS_VIS", "PAD"],
)
@triton.jit
def _grad_volume_kernel(dout_ptr, w_ptr, vis_ptr, dvol_ptr,
                        M, E, KDIM, T, N, D, H, W, nH, nW,
                        stride_b, stride_c, stride_d, stride_h, stride_w,
                        stride_vb, stride_vt,
                        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        HAS_VIS: tl.constexpr, PAD: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_off, d0, h0, w0, n, row_ok = _token_rows(vis_ptr, m, M, T, N, nH, nW, stride_vb, stride_vt,
                                                 stride_b, stride_d, stride_h, stride_w,
                                                 PD, PH, PW, HAS_VIS)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = tl.multiple_of(e0, BLOCK_E) + tl.arange(0, BLOCK_E)
        g = tl.load(dout_ptr + m[:, None].to(tl.int64) * E + e[None, :],
                    mask=row_ok[:, None] & (e < E)[None, :], other=0.0)
        w = tl.load(w_ptr + e[:, None].to(tl.int64) * KDIM + k[None, :],
                    mask=(e < E)[:, None] & (k < KDIM)[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(g.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(g, w)
    col_off, i, j, l, col_ok = _patch_cols(k, KDIM, stride_c, stride_d, stride_h, stride_w, PD, PH, PW)
    mask = row_ok[:, None] & col_ok[None, :]
    if PAD:
        mask = mask & ((d0[:, None] + i[None, :]) < D) & ((h0[:, None] + j[None, :]) < H) \
            & ((w0[:, None] + l[None, :]) < W)
    tl.store(dvol_ptr + row_off[:, None] + col_off[None, :], acc.to(dvol_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _geometry(volume: torch.Tensor, patch: tuple[int, int, int]) -> tuple[int, int, int, int]:
    _, _, D, H, W = volume.shape
    pd, ph, pw = patch
    nD, nH, nW = -(-D // pd), -(-H // ph), -(-W // pw)  # ceil: the caller decided on padding
    return nD, nH, nW, nD * nH * nW


def _vis_args(visible: torch.Tensor | None, volume: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if visible is None:
        return volume, 0, 0  # dummy pointer, never read (HAS_VIS=False)
    return visible, visible.stride(0), visible.stride(1)


def forward(volume: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            pos_embed: torch.Tensor | None, visible: torch.Tensor | None, pad: bool) -> torch.Tensor:
    """Tokens (B, T, E): T = N without ``visible``, else visible.shape[1]. Inputs share one dtype."""
    B, C, D, H, W = volume.shape
    E = weight.shape[0]
    patch = tuple(int(s) for s in weight.shape[2:])
    KDIM = C * patch[0] * patch[1] * patch[2]
    nD, nH, nW, N = _geometry(volume, patch)
    T = N if visible is None else visible.shape[1]
    M = B * T
    w2 = weight.reshape(E, KDIM).contiguous()
    out = _empty((B, T, E), volume.device, volume.dtype)
    if M == 0 or E == 0:
        return out
    vis, svb, svt = _vis_args(visible, volume)
    bias_arg = bias.contiguous() if bias is not None else w2
    pos_arg = pos_embed.contiguous() if pos_embed is not None else w2

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(E, meta["BLOCK_N"]),)

    _forward_kernel[grid](
        volume, w2, bias_arg, pos_arg, vis, out,
        M, E, KDIM, T, N, D, H, W, nH, nW,
        *volume.stride(), svb, svt,
        PD=patch[0], PH=patch[1], PW=patch[2],
        HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, HAS_VIS=visible is not None,
        PAD=bool(pad), DOT_FP32=_interpreting(), enable_fp_fusion=FP_FUSION)
    record("patch_embed3d.forward")
    return out


def _split_for(M: int, E: int, KDIM: int, sms: int | None, block_e: int, block_k: int) -> int:
    """Splits of the M reduction for one (BLOCK_E, BLOCK_K) tile so that the weight-gradient grid
    fills the GPU (tiles x splits >= ~2 waves; at least 256 rows per split, at most 32 splits)."""
    if sms is None:
        return 1
    tiles = triton.cdiv(E, block_e) * triton.cdiv(KDIM, block_k)
    return int(max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(M, 256), 32)))


def grad_weight_bias(volume: torch.Tensor, grad_out: torch.Tensor, visible: torch.Tensor | None,
                     weight_shape: tuple[int, ...], pad: bool, need_bias: bool,
                     split: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 (dW in the weight's shape, dBias or None); deterministic (fixed-order partial sums).

    ``split``: programs along M per (E, K) tile; by default sized per autotune config (64 x 64
    tiles get more splits than 128 x 128 ones, so both fill the GPU).
    """
    B, C, D, H, W = volume.shape
    E = weight_shape[0]
    patch = tuple(int(s) for s in weight_shape[2:])
    KDIM = C * patch[0] * patch[1] * patch[2]
    nD, nH, nW, N = _geometry(volume, patch)
    T = grad_out.shape[1]
    M = B * T
    sms = multiprocessors(volume.device)
    cap = max(M, 1)
    if split:
        splits_of = lambda meta: max(1, min(split, cap))  # noqa: E731
    else:
        splits_of = lambda meta: min(_split_for(M, E, KDIM, sms, meta["BLOCK_E"], meta["BLOCK_K"]), cap)  # noqa: E731
    most = max(splits_of(cfg.kwargs) for cfg in _grad_weight_kernel.configs)
    dw = _empty((most, E, KDIM), volume.device, torch.float32)
    db = _empty((most, E), volume.device, torch.float32) if need_bias else dw
    g = grad_out.contiguous()
    vis, svb, svt = _vis_args(visible, volume)
    launched: list[int] = []

    def grid(meta):
        # evaluated once per launch; the autotuner launches the chosen config last, so
        # launched[-1] is the number of partials the final launch wrote
        n_split = splits_of(meta)
        launched.append(n_split)
        return (triton.cdiv(E, meta["BLOCK_E"]), triton.cdiv(KDIM, meta["BLOCK_K"]), n_split)

    _grad_weight_kernel[grid](
        volume, g, vis, dw, db,
        M, E, KDIM, T, N, D, H, W, nH, nW,
        *volume.stride(), svb, svt,
        PD=patch[0], PH=patch[1], PW=patch[2], HAS_VIS=visible is not None, PAD=bool(pad),
        NEED_BIAS=need_bias, DOT_FP32=_interpreting(), enable_fp_fusion=FP_FUSION)
    record("patch_embed3d.grad_weight")
    used = launched[-1] if launched else most
    dweight = (dw[0] if used == 1 else dw[:used].sum(0)).reshape(weight_shape)
    dbias = None
    if need_bias:
        dbias = db[0] if used == 1 else db[:used].sum(0)
    return dweight, dbias


def grad_pos(grad_out: torch.Tensor, visible: torch.Tensor | None, num_tokens: int,
             dtype: torch.dtype) -> torch.Tensor:
    """(N, E) position-embedding gradient in ``dtype`` (no atomics: inverse map of ``visible``)."""
    B, T, E = grad_out.shape
    N = num_tokens
    g = grad_out.contiguous()
    dpos = _empty((N, E), g.device, dtype)
    if visible is not None:
        # an index outside [0, N) (only with check_visible=False) lands in a spare column, dropped
        idx = visible.long()
        idx = torch.where((idx >= 0) & (idx < N), idx, N)
        inv = torch.full((B, N + 1), -1, device=g.device, dtype=torch.int32)
        inv.scatter_(1, idx, torch.arange(T, device=g.device, dtype=torch.int32).expand(B, T))
        inv = inv[:, :N].contiguous()
    else:
        inv = g

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_T"]), triton.cdiv(E, meta["BLOCK_E"]))

    _grad_pos_kernel[grid](g, inv, dpos, B, N, E, T, HAS_VIS=visible is not None, enable_fp_fusion=FP_FUSION)
    record("patch_embed3d.grad_pos")
    return dpos


def grad_volume(grad_out: torch.Tensor, weight: torch.Tensor, visible: torch.Tensor | None,
                volume_shape: tuple[int, ...], pad: bool) -> torch.Tensor:
    """Volume gradient (B, C, D, H, W) in the weight's dtype, contiguous."""
    B, C, D, H, W = volume_shape
    E = weight.shape[0]
    patch = tuple(int(s) for s in weight.shape[2:])
    KDIM = C * patch[0] * patch[1] * patch[2]
    nD, nH, nW, N = _geometry(torch.empty(volume_shape, device="meta"), patch)
    T = grad_out.shape[1]
    M = B * T
    # without ``visible`` every voxel (padded or not) has exactly one writer; masked patches have none
    if visible is None:
        dvol = _empty(volume_shape, grad_out.device, weight.dtype)
    else:
        dvol = torch.zeros(volume_shape, device=grad_out.device, dtype=weight.dtype)
    if M == 0:
        return dvol
    g = grad_out.contiguous()
    w2 = weight.reshape(E, KDIM).contiguous()
    vis, svb, svt = _vis_args(visible, dvol)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(KDIM, meta["BLOCK_K"]))

    _grad_volume_kernel[grid](
        g, w2, vis, dvol,
        M, E, KDIM, T, N, D, H, W, nH, nW,
        *dvol.stride(), svb, svt,
        PD=patch[0], PH=patch[1], PW=patch[2], HAS_VIS=visible is not None, PAD=bool(pad),
        DOT_FP32=_interpreting(), enable_fp_fusion=FP_FUSION)
    record("patch_embed3d.grad_volume")
    return dvol
