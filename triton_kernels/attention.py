"""Masked cross-attention: flash-style forward and backward kernels (no L x L matrix in memory).

Computes, per (batch, head), ``out = dropout(softmax(scale * q @ k^T + mask_bias)) @ v`` with a
boolean key mask (B, Lk) and a boolean query mask (B, Lq). A query row that is masked, or whose
keys are all masked, outputs zeros, has log-sum-exp ``+inf`` and receives zero gradient.

Kernels
    ``_fwd_kernel``   grid (ceil(Lq / BLOCK_M), B*H): one query block streams every key block once
                      with an online softmax (fp32 running max / sum / accumulator); writes ``out``
                      and the row log-sum-exp (natural log, fp32; +inf for dead rows).
    ``_bwd_dq_kernel`` grid (ceil(Lq / BLOCK_M), B*H): computes delta = rowsum(dO * O) for its rows
                      (the usual "preprocess" pass, fused here), stores it, and accumulates dq
                      over the key blocks, recomputing P = exp(S - lse) blockwise.
    ``_bwd_dkdv_kernel`` grid (ceil(Lk / BLOCK_N), B*H): accumulates dk and dv over the query
                      blocks. Each output element is owned by one program: no atomics, so the
                      backward is deterministic (reruns are bit-identical) by construction.

Memory traffic: forward reads q once and k, v once per query block (ceil(Lq/BLOCK_M) times);
writes out + lse. Backward reads q, k, v, dO, O (O only for delta), lse, delta: dq pass reads
k, v once per query block, dk/dv pass reads q, dO once per key block. Extra memory: lse and
delta, fp32, B*H*Lq each: linear in length.

Layout: every tensor is addressed through its strides with up to two batch dimensions (b0, b1),
so strided views (e.g. q/k/v sliced out of one packed projection, groups of a 3-D token grid
folded into the batch, masks expanded with stride 0) are read in place without copies.

Dropout: in-kernel, Philox (``tl.rand``) keyed by a seed read from a device tensor and by the
element offset ((b*H + h) * Lq + m) * Lk + n (int32 arithmetic: wraps for B*H*Lq*Lk >= 2^31,
which only repeats the random stream). The backward regenerates the same mask.

Limits: head dim <= 128 (BLOCK_D = next power of two >= 16); fp32/fp16/bf16 inputs, fp32
accumulation; fp32 inputs use tf32 ``tl.dot`` on GPU (relative error < 2e-3). Under the
interpreter (``TRITON_INTERPRET=1``) tiles are cast to fp32 before ``tl.dot`` (bf16 dot is wrong
there) and one small config is used instead of autotuning.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lungcore.triton_kernels._launch import FP_FUSION, record

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535


def _configs(kind: str) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if kind == "fwd" or kind == "dq":
        # (BLOCK_M, BLOCK_N, warps, stages); 128 x 32 runs 8 warps: with 4 its fp32 dq pass sat at
        # the 255-register cap at D = 64 (benchmarks.aot)
        shapes = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                  (64, 16, 4, 2), (128, 16, 4, 2), (32, 16, 2, 2)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in shapes]
    # dk/dv: BLOCK_N rows of k/v are owned, BLOCK_M query rows streamed; 32 x 128 and 64 x 64 hold
    # two (BLOCK_N, D) fp32 accumulators and run 8 warps (with 4 they sat at 250-255 registers at D = 64)
    shapes = [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 2),
              (32, 32, 4, 2), (64, 16, 4, 2), (32, 16, 2, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


# Autotuning is keyed on the lengths' power-of-two buckets (LQ_BUCKET, LK_BUCKET: kernel arguments
# the body never reads), not on the raw lengths, so a new length re-tunes only when it crosses a
# power of two; the configs are pruned on the same buckets (a config whose tile is longer than the
# bucket only multiplies padding on the tensor cores), so every length of a bucket gets the same
# candidates.
_KEY = ["LQ_BUCKET", "LK_BUCKET", "BLOCK_D", "HAS_KM", "HAS_QM", "DROPOUT"]


def length_bucket(n: int) -> int:
    """The autotune bucket of a length: the next power of two, at least 16 (the smallest tile)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _prune(configs, nargs, **kwargs):
    """Drop configs whose key tile (BLOCK_N) or query tile (BLOCK_M) exceeds the length's bucket:
    at network A's Lk = 16 a BLOCK_N of 64-128 is 75-87 % padding. Keeps at least the smallest."""
    lq, lk = nargs["LQ_BUCKET"], nargs["LK_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= lk and c.kwargs["BLOCK_M"] <= lq]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]))]


_PRUNE = {"early_config_prune": _prune}


@triton.jit
def _program_ids(BH, H, B1):
    pid_bh = tl.program_id(1) + tl.program_id(2) * 65535
    b = pid_bh // H
    h = pid_bh % H
    b0 = (b // B1).to(tl.int64)
    b1 = (b % B1).to(tl.int64)
    return pid_bh, b0, b1, h.to(tl.int64)


@triton.jit
def _row_alive(QM, sqm_b0, sqm_b1, sqm_l, b0, b1, offs_m, Lq, HAS_QM: tl.constexpr):
    alive = offs_m < Lq
    if HAS_QM:
        qm = tl.load(QM + b0 * sqm_b0 + b1 * sqm_b1 + offs_m * sqm_l, mask=offs_m < Lq, other=0)
        alive = alive & (qm != 0)
    return alive


@triton.jit
def _key_valid(KM, skm_b0, skm_b1, skm_l, b0, b1, offs_n, Lk, HAS_KM: tl.constexpr):
    valid = offs_n < Lk
    if HAS_KM:
        km = tl.load(KM + b0 * skm_b0 + b1 * skm_b1 + offs_n * skm_l, mask=offs_n < Lk, other=0)
        valid = valid & (km != 0)
    return valid


@triton.autotune(configs=_configs("fwd"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET"])
def _fwd_kernel(
    Q, K, V, KM, QM, O, LSE, SEED,
    sq_b0, sq_b1, sq_h, sq_l, sq_d,
    sk_b0, sk_b1, sk_h, sk_l, sk_d,
    sv_b0, sv_b1, sv_h, sv_l, sv_d,
    so_b0, so_b1, so_h, so_l, so_d,
    skm_b0, skm_b1, skm_l, sqm_b0, sqm_b1, sqm_l,
    BH, H, B1, Lq, Lk, D, scale_log2, dropout_p, LQ_BUCKET, LK_BUCKET,
    HAS_KM: tl.constexpr, HAS_QM: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh, b0, b1, h = _program_ids(BH, H, B1)
    if pid_bh >= BH:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = Q + b0 * sq_b0 + b1 * sq_b1 + h * sq_h
    k_base = K + b0 * sk_b0 + b1 * sk_b1 + h * sk_h
    v_base = V + b0 * sv_b0 + b1 * sv_b1 + h * sv_h

    alive = _row_alive(QM, sqm_b0, sqm_b1, sqm_l, b0, b1, offs_m, Lq, HAS_QM)
    q = tl.load(q_base + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)
    # a block of dead query rows (padding in folded groups) skips the key loop entirely
    n_end = tl.where(tl.max(alive.to(tl.int32), axis=0) > 0, Lk, 0)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = _key_valid(KM, skm_b0, skm_b1, skm_l, b0, b1, offs_n, Lk, HAS_KM)
        kt = tl.load(k_base + offs_n[None, :] * sk_l + offs_d[:, None] * sk_d,
                     mask=(offs_n[None, :] < Lk) & d_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_l + offs_d[None, :] * sv_d,
                    mask=(offs_n[:, None] < Lk) & d_ok[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows with no valid key so far keep m = -inf; subtract 0 instead (exp2(-inf) = 0, no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            offs = (pid_bh * Lq + offs_m)[:, None] * Lk + offs_n[None, :]
            keep = tl.rand(seed, offs) >= dropout_p
            p = tl.where(keep, p * keep_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    alive = alive & (l_i > 0.0)
    l_safe = tl.where(alive, l_i, 1.0)
    out = tl.where(alive[:, None], acc / l_safe[:, None], 0.0)
    o_base = O + b0 * so_b0 + b1 * so_b1 + h * so_h
    tl.store(o_base + offs_m[:, None] * so_l + offs_d[None, :] * so_d, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & d_ok[None, :])
    lse = tl.where(alive, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.autotune(configs=_configs("dq"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET"])
def _bwd_dq_kernel(
    Q, K, V, KM, QM, O, DO, LSE, DELTA, DQ, SEED,
    sq_b0, sq_b1, sq_h, sq_l, sq_d,
    sk_b0, sk_b1, sk_h, sk_l, sk_d,
    sv_b0, sv_b1, sv_h, sv_l, sv_d,
    so_b0, so_b1, so_h, so_l, so_d,
    sdo_b0, sdo_b1, sdo_h, sdo_l, sdo_d,
    sdq_b0, sdq_b1, sdq_h, sdq_l, sdq_d,
    skm_b0, skm_b1, skm_l, sqm_b0, sqm_b1, sqm_l,
    BH, H, B1, Lq, Lk, D, scale, scale_log2, dropout_p, LQ_BUCKET, LK_BUCKET,
    HAS_KM: tl.constexpr, HAS_QM: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh, b0, b1, h = _program_ids(BH, H, B1)
    if pid_bh >= BH:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < Lq
    md_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b0 * sq_b0 + b1 * sq_b1 + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=md_mask, other=0.0)
    do = tl.load(DO + b0 * sdo_b0 + b1 * sdo_b1 + h * sdo_h + offs_m[:, None] * sdo_l
                 + offs_d[None, :] * sdo_d, mask=md_mask, other=0.0)
    o = tl.load(O + b0 * so_b0 + b1 * so_b1 + h * so_h + offs_m[:, None] * so_l + offs_d[None, :] * so_d,
                mask=md_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    row_base = pid_bh.to(tl.int64) * Lq
    tl.store(DELTA + row_base + offs_m, delta, mask=row_ok)
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)
    k_base = K + b0 * sk_b0 + b1 * sk_b1 + h * sk_h
    v_base = V + b0 * sv_b0 + b1 * sv_b1 + h * sv_h
    # dead rows have lse = +inf, so P = 0 and dq = 0: skip their key loop
    n_end = tl.where(tl.min(lse2, axis=0) < float("inf"), Lk, 0)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = _key_valid(KM, skm_b0, skm_b1, skm_l, b0, b1, offs_n, Lk, HAS_KM)
        nd_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d, mask=nd_mask, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * sv_l + offs_d[:, None] * sv_d,
                     mask=(offs_n[None, :] < Lk) & d_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt)
        if DROPOUT:
            offs = (pid_bh * Lq + offs_m)[:, None] * Lk + offs_n[None, :]
            keep = tl.rand(seed, offs) >= dropout_p
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    tl.store(DQ + b0 * sdq_b0 + b1 * sdq_b1 + h * sdq_h + offs_m[:, None] * sdq_l + offs_d[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.autotune(configs=_configs("dkdv"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET"])
def _bwd_dkdv_kernel(
    Q, K, V, KM, DO, LSE, DELTA, DK, DV, SEED,
    sq_b0, sq_b1, sq_h, sq_l, sq_d,
    sk_b0, sk_b1, sk_h, sk_l, sk_d,
    sv_b0, sv_b1, sv_h, sv_l, sv_d,
    sdo_b0, sdo_b1, sdo_h, sdo_l, sdo_d,
    sdk_b0, sdk_b1, sdk_h, sdk_l, sdk_d,
    sdv_b0, sdv_b1, sdv_h, sdv_l, sdv_d,
    skm_b0, skm_b1, skm_l,
    BH, H, B1, Lq, Lk, D, scale, scale_log2, dropout_p, LQ_BUCKET, LK_BUCKET,
    HAS_KM: tl.constexpr, HAS_QM: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh, b0, b1, h = _program_ids(BH, H, B1)
    if pid_bh >= BH:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    nd_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
    valid = _key_valid(KM, skm_b0, skm_b1, skm_l, b0, b1, offs_n, Lk, HAS_KM)
    k = tl.load(K + b0 * sk_b0 + b1 * sk_b1 + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d,
                mask=nd_mask, other=0.0)
    v = tl.load(V + b0 * sv_b0 + b1 * sv_b1 + h * sv_h + offs_n[:, None] * sv_l + offs_d[None, :] * sv_d,
                mask=nd_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)
    q_base = Q + b0 * sq_b0 + b1 * sq_b1 + h * sq_h
    do_base = DO + b0 * sdo_b0 + b1 * sdo_b1 + h * sdo_h
    row_base = pid_bh.to(tl.int64) * Lq
    # a block of masked keys gets zero gradient: skip its query loop
    m_end = tl.where(tl.max(valid.to(tl.int32), axis=0) > 0, Lq, 0)
    for start_m in range(0, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        md_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d, mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdo_l + offs_d[None, :] * sdo_d, mask=md_mask, other=0.0)
        lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        st = tl.dot(k, tl.trans(q)) * scale_log2                      # (BLOCK_N, BLOCK_M)
        st = tl.where(valid[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse2[None, :])
        dpt = tl.dot(v, tl.trans(do))
        if DROPOUT:
            offs = (pid_bh * Lq + offs_m)[None, :] * Lk + offs_n[:, None]
            keep = tl.rand(seed, offs) >= dropout_p
            pt_drop = tl.where(keep, pt * keep_scale, 0.0)
            dpt = tl.where(keep, dpt * keep_scale, 0.0)
            dv += tl.dot(pt_drop.to(do.dtype), do)
        else:
            dv += tl.dot(pt.to(do.dtype), do)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
    dk = dk * scale
    tl.store(DK + b0 * sdk_b0 + b1 * sdk_b1 + h * sdk_h + offs_n[:, None] * sdk_l + offs_d[None, :] * sdk_d,
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b0 * sdv_b0 + b1 * sdv_b1 + h * sdv_h + offs_n[:, None] * sdv_l + offs_d[None, :] * sdv_d,
             dv.to(DV.dtype.element_ty), mask=nd_mask)


# ----------------------------------------------------------------------------------- launchers
def _strides5(t):
    """Strides of a (B0, B1, H, L, D) tensor."""
    return tuple(t.stride())


def _mask_args(mask):
    """(pointer tensor, stride_b0, stride_b1, stride_l) for a (B0, B1, L) bool mask, or dummies."""
    if mask is None:
        return None, 0, 0, 0
    return mask.view(torch.uint8), *mask.stride()


def _grid_bh(bh: int) -> tuple[int, int]:
    return min(bh, _MAX_GRID_Y), triton.cdiv(bh, _MAX_GRID_Y)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def attention_forward(q, k, v, key_mask, query_mask, out, lse, seed, scale: float, dropout_p: float):
    """Launch the forward kernel. q (B0, B1, H, Lq, D), k/v (B0, B1, H, Lk, D) any strides;
    masks (B0, B1, L) bool or None; writes ``out`` (same shape as q, any strides) and ``lse``
    (B0*B1*H*Lq contiguous fp32); ``seed`` an int32 device tensor (used when dropout_p > 0)."""
    _, b1, h, lq, d = q.shape
    lk = k.shape[3]
    bh = q.shape[0] * b1 * h
    km, *skm = _mask_args(key_mask)
    qm, *sqm = _mask_args(query_mask)
    gy, gz = _grid_bh(bh)
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), gy, gz)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, km if km is not None else q, qm if qm is not None else q, out, lse, seed,
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out), *skm, *sqm,
        bh, h, b1, lq, lk, d, scale * _LOG2E, dropout_p, length_bucket(lq), length_bucket(lk),
        HAS_KM=key_mask is not None, HAS_QM=query_mask is not None, DROPOUT=dropout_p > 0,
        DOT_FP32=_INTERPRET, BLOCK_D=_block_d(d), enable_fp_fusion=FP_FUSION,
    )
    record("masked_cross_attention.forward")


def attention_backward(grad_out, q, k, v, out, lse, key_mask, query_mask, seed, dq, dk, dv, delta,
                       scale: float, dropout_p: float):
    """Launch the two backward kernels (dq + delta, then dk/dv); writes dq, dk, dv, delta."""
    _, b1, h, lq, d = q.shape
    lk = k.shape[3]
    bh = q.shape[0] * b1 * h
    km, *skm = _mask_args(key_mask)
    qm, *sqm = _mask_args(query_mask)
    gy, gz = _grid_bh(bh)
    buckets = (length_bucket(lq), length_bucket(lk))
    common = dict(HAS_KM=key_mask is not None, HAS_QM=query_mask is not None, DROPOUT=dropout_p > 0,
                  DOT_FP32=_INTERPRET, BLOCK_D=_block_d(d), enable_fp_fusion=FP_FUSION)
    grid_q = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), gy, gz)  # noqa: E731
    _bwd_dq_kernel[grid_q](
        q, k, v, km if km is not None else q, qm if qm is not None else q, out, grad_out, lse, delta, dq, seed,
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out), *_strides5(grad_out), *_strides5(dq),
        *skm, *sqm, bh, h, b1, lq, lk, d, scale, scale * _LOG2E, dropout_p, *buckets, **common,
    )
    record("masked_cross_attention.backward_dq")
    grid_k = lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), gy, gz)  # noqa: E731
    _bwd_dkdv_kernel[grid_k](
        q, k, v, km if km is not None else q, grad_out, lse, delta, dk, dv, seed,
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(grad_out), *_strides5(dk), *_strides5(dv),
        *skm, bh, h, b1, lq, lk, d, scale, scale * _LOG2E, dropout_p, *buckets, **common,
    )
    record("masked_cross_attention.backward_dkdv")


__all__ = ["attention_forward", "attention_backward"]
