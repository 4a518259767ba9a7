"""Cox partial-likelihood kernels: multi-block segmented scans over time-sorted subjects.

What it computes. Subjects are sorted (outside, by ``torch.sort``) by (stratum, time) ascending;
``perm`` maps sorted position -> original row. Each launcher gathers risk, weight, event (and a
per-row upstream gradient) through ``perm`` once, into contiguous sorted buffers, so every scan
pass streams them in order (coalesced); only the final gradient / per-row store scatters through
``perm``. A *tie group* is a run of equal (stratum, time); the risk
set of group g is everything from g's first member to the end of its stratum. Per group:

    S_g = sum_{risk set} w e^eta,  T_g = sum_{events in g} w e^eta,  rho_g = T_g / S_g,
    d_g = #events (w > 0),  W_g = sum_{events in g} w,
    L_g = log S_g                                            (Breslow)
    L_g = log S_g + 1/d_g sum_{l<d_g} log(1 - l rho_g / d_g) (Efron)

and the loss is sum_{events i} w_i (L_{g(i)} - eta_i). Every sum is an associative scan whose
state is (stratum flag, group flag, m, s, v1, v2, v3): (m, s) is an online log-sum-exp
(value s * e^m, rescaled when m grows, so the result never overflows; risks are first centred on
the largest live risk, so eta - log S stays exact in fp32 whatever their offset),
segmented by stratum; v1 is a group-segmented sum on the same e^m scale, v2/v3 are plain
group-segmented sums. One scan = three launches (reduce-then-scan): per-block aggregates,
one program scanning the block aggregates, per-block local scan + carry-in + the mode's outputs.
Group totals are read at the group's first member (``start_of``, from ``torch.cummax``), so tie
groups of any size, spanning any number of blocks, are exact. The Efron sum over l is
distributed over the group's events (the event with r later events in its group takes l = r),
so no loop depends on the group size.

    forward : scan A (reverse; S, rho, d, W)  -> loss kernel (block partial sums, or per-row
              terms for reduction='none', which first runs scan U (reverse; group sum of the
              Efron terms))
    backward: scan B (reverse; group sums of the Efron a/b terms and of the upstream gradient)
              -> scan C (forward, stratum-segmented, scaled sum of Q_g a_g / S_g) whose apply
              step writes d loss / d risk straight to the original row order.

Memory traffic: one gather of risk (2-8 B), weight (4 B) and event (1 B) per launcher call; then
each kernel streams the sorted copies, flags (1 B each) and a few fp32 scratch rows in order,
and perm (8 B) only where it scatters; plus 7 x N/BLOCK aggregates. No atomics: reruns are
bit-identical.
Limits: 1-D inputs; risk float16/bfloat16/float32 (fp32 accumulation) or float64 (fp64
accumulation); d_g is counted in the accumulation dtype (exact to 2^24 events per tie group in
fp32). BLOCK is shared by the three phases of a scan, so it is chosen by size, not autotuned:
the largest power of two in [256, 2048] (1024 for fp64) that keeps at least 2 blocks per multiprocessor
(so n = 65,536 launches 256 blocks on 132 SMs, not 64), with warps sized so that no thread
holds more than 4 fp64 or 8 fp32 subjects (the fp64 scan state otherwise reaches the register cap).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lungcore.triton_kernels._launch import FP_FUSION, multiprocessors, record

# "empty" log-scale: exp(NEG - m) == 0 and exp(NEG - NEG) * 0 == 0, never NaN (constexpr: jit
# functions may only read constexpr globals on a real GPU compile)
NEG: tl.constexpr = tl.constexpr(-1.0e30)

MODE_STATS = 0   # reverse: (log S, rho, d, W) suffix values
MODE_BWD = 1     # reverse: group suffix sums of (a, b, q)
MODE_EFRON = 2   # reverse: group suffix sums of the Efron log terms u
MODE_GRAD = 3    # forward: C scan -> gradient


@triton.jit
def _combine(fs_a, fg_a, m_a, s_a, v1_a, v2_a, v3_a, fs_b, fg_b, m_b, s_b, v1_b, v2_b, v3_b):
    # a precedes b in scan order; a set flag in b cuts everything before it (segmented scan)
    m = tl.where(fs_b != 0, m_b, tl.maximum(m_a, m_b))
    # both <= 1 wherever they are selected; the clamp keeps unselected lanes finite (no inf * 0)
    ea = tl.exp(tl.minimum(m_a - m, 0.0))
    eb = tl.exp(tl.minimum(m_b - m, 0.0))
    s = tl.where(fs_b != 0, s_b, s_a * ea + s_b * eb)
    v1 = tl.where(fg_b != 0, v1_b * eb, v1_a * ea + v1_b * eb)
    v2 = tl.where(fg_b != 0, v2_b, v2_a + v2_b)
    v3 = tl.where(fg_b != 0, v3_b, v3_a + v3_b)
    return fs_a | fs_b, fg_a | fg_b, m, s, v1, v2, v3


@triton.jit
def _load_row(offs, valid, risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, HAS_W: tl.constexpr, ACC: tl.constexpr):
    # risk, weight and event are the launcher's sorted copies (contiguous); idx (the original row)
    # is only used by the stores that scatter, and the compiler drops its load elsewhere
    idx = tl.load(perm_ptr + offs, mask=valid, other=0)
    # subtracting the batch's largest live risk first keeps eta - log S exact in fp32 whatever
    # the offset of the risks (the loss and gradient are invariant to it)
    eta = tl.load(risk_ptr + offs, mask=valid, other=0.0).to(ACC) - tl.load(shift_ptr)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(ACC)
    else:
        w = tl.where(valid, 1.0, 0.0).to(ACC)
    e = (tl.load(ev_ptr + offs, mask=valid, other=0) != 0) & valid
    ev = e & (w > 0)
    return idx, eta, w, e, ev


@triton.jit
def _state(offs, valid, N, risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, gstart_ptr, sstart_ptr, start_ptr,
           stats_ptr, sums_ptr, g_ptr,
           MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_STRATA: tl.constexpr,
           EFRON: tl.constexpr, G_VEC: tl.constexpr, ACC: tl.constexpr):
    idx, eta, w, e, ev = _load_row(offs, valid, risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, HAS_W, ACC)
    zero = tl.zeros(offs.shape, ACC)
    if MODE == 3:
        # forward scan: segment flags at the first member of a stratum / group
        fg = tl.load(gstart_ptr + offs, mask=valid, other=0).to(tl.int32)
        if HAS_STRATA:
            fs = tl.load(sstart_ptr + offs, mask=valid, other=0).to(tl.int32)
        else:
            fs = (offs == 0).to(tl.int32)
    else:
        # reverse scan: segment flags at the last member (the next subject starts a new one)
        nxt = offs + 1
        has_nxt = nxt < N
        fg = tl.where(has_nxt, tl.load(gstart_ptr + nxt, mask=valid & has_nxt, other=1), 1).to(tl.int32)
        if HAS_STRATA:
            fs = tl.where(has_nxt, tl.load(sstart_ptr + nxt, mask=valid & has_nxt, other=1), 1).to(tl.int32)
        else:
            fs = (~has_nxt).to(tl.int32)
    fs = tl.where(valid, fs, 0)
    fg = tl.where(valid, fg | fs, 0)
    if MODE == 0:
        m = tl.where(w > 0, eta, NEG)
        s = tl.where(w > 0, w, 0.0)        # w e^(eta - m) with m = eta
        v1 = tl.where(ev, w, 0.0)          # T on the same scale
        v2 = ev.to(ACC)                    # d
        v3 = tl.where(ev, w, 0.0)          # W
    elif MODE == 3:
        first = (tl.load(gstart_ptr + offs, mask=valid, other=0) != 0) & valid
        a_g = tl.load(sums_ptr + offs, mask=first, other=0.0)
        q_g = tl.load(sums_ptr + 2 * N + offs, mask=first, other=0.0)
        log_s = tl.load(stats_ptr + offs, mask=first, other=0.0)
        qa = q_g * a_g
        live = first & (qa != 0)
        m = tl.where(live, -log_s, NEG)
        s = tl.where(live, qa, 0.0)
        v1 = zero
        v2 = zero
        v3 = zero
    else:
        j = tl.load(start_ptr + offs, mask=valid, other=0)
        rho = tl.load(stats_ptr + N + j, mask=valid, other=0.0)
        d = tl.load(stats_ptr + 2 * N + j, mask=valid, other=1.0)
        d = tl.where(d > 0, d, 1.0)
        r = tl.load(stats_ptr + 2 * N + offs, mask=valid, other=0.0) - ev.to(ACC)
        m = zero
        s = zero
        if MODE == 2:
            v1 = tl.where(ev, tl.log(1.0 - r * rho / d), 0.0)
            v2 = zero
            v3 = zero
        else:
            if EFRON:
                den = d - r * rho
                den = tl.where(ev, den, 1.0)
                v1 = tl.where(ev, 1.0 / den, 0.0)
                v2 = tl.where(ev, (r / d) / den, 0.0)
            else:
                v1 = tl.where(ev, 1.0 / d, 0.0)
                v2 = zero
            if G_VEC:
                g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(ACC)
            else:
                g = tl.load(g_ptr).to(ACC)
            v3 = tl.where(e & (w > 0), w * g, 0.0)
    return fs, fg, m, s, v1, v2, v3


@triton.jit
def _offsets(pid, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    lane = tl.arange(0, BLOCK)
    if REVERSE:
        return pid * BLOCK + (BLOCK - 1 - lane)
    else:
        return pid * BLOCK + lane


@triton.jit
def _last(x, BLOCK: tl.constexpr):
    lane = tl.arange(0, BLOCK)
    return tl.sum(tl.where(lane == BLOCK - 1, x, 0), axis=0)


@triton.jit
def _scan_aggregate_kernel(risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, gstart_ptr, sstart_ptr, start_ptr,
                           stats_ptr, sums_ptr, g_ptr, agg_ptr, N, NB,
                           MODE: tl.constexpr, REVERSE: tl.constexpr, HAS_W: tl.constexpr,
                           HAS_STRATA: tl.constexpr, EFRON: tl.constexpr, G_VEC: tl.constexpr,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = _offsets(pid, BLOCK, REVERSE)
    valid = offs < N
    st = _state(offs, valid, N, risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, gstart_ptr, sstart_ptr, start_ptr,
                stats_ptr, sums_ptr, g_ptr, MODE, HAS_W, HAS_STRATA, EFRON, G_VEC, ACC)
    fs, fg, m, s, v1, v2, v3 = tl.associative_scan(st, 0, _combine)
    tl.store(agg_ptr + 0 * NB + pid, _last(fs, BLOCK).to(ACC))
    tl.store(agg_ptr + 1 * NB + pid, _last(fg, BLOCK).to(ACC))
    tl.store(agg_ptr + 2 * NB + pid, _last(m, BLOCK))
    tl.store(agg_ptr + 3 * NB + pid, _last(s, BLOCK))
    tl.store(agg_ptr + 4 * NB + pid, _last(v1, BLOCK))
    tl.store(agg_ptr + 5 * NB + pid, _last(v2, BLOCK))
    tl.store(agg_ptr + 6 * NB + pid, _last(v3, BLOCK))


@triton.jit
def _scan_carry_kernel(agg_ptr, incl_ptr, NB, REVERSE: tl.constexpr, ACC: tl.constexpr, CB: tl.constexpr):
    # one program: inclusive scan of the block aggregates in scan order, CB at a time with a carry
    lane = tl.arange(0, CB)
    # 0-d carries (identity), built by reductions so their type matches _last's
    c_fs = tl.sum(tl.zeros([CB], tl.int32), axis=0)
    c_fg = c_fs
    c_m = tl.max(tl.full([CB], NEG, ACC), axis=0)
    c_s = tl.sum(tl.zeros([CB], ACC), axis=0)
    c_1 = c_s
    c_2 = c_s
    c_3 = c_s
    for start in range(0, NB, CB):
        k = start + lane
        valid = k < NB
        if REVERSE:
            b = NB - 1 - k
        else:
            b = k
        fs = tl.load(agg_ptr + 0 * NB + b, mask=valid, other=0.0).to(tl.int32)
        fg = tl.load(agg_ptr + 1 * NB + b, mask=valid, other=0.0).to(tl.int32)
        m = tl.load(agg_ptr + 2 * NB + b, mask=valid, other=NEG)
        s = tl.load(agg_ptr + 3 * NB + b, mask=valid, other=0.0)
        v1 = tl.load(agg_ptr + 4 * NB + b, mask=valid, other=0.0)
        v2 = tl.load(agg_ptr + 5 * NB + b, mask=valid, other=0.0)
        v3 = tl.load(agg_ptr + 6 * NB + b, mask=valid, other=0.0)
        fs, fg, m, s, v1, v2, v3 = tl.associative_scan((fs, fg, m, s, v1, v2, v3), 0, _combine)
        fs, fg, m, s, v1, v2, v3 = _combine(c_fs, c_fg, c_m, c_s, c_1, c_2, c_3, fs, fg, m, s, v1, v2, v3)
        tl.store(incl_ptr + 0 * NB + b, fs.to(ACC), mask=valid)
        tl.store(incl_ptr + 1 * NB + b, fg.to(ACC), mask=valid)
        tl.store(incl_ptr + 2 * NB + b, m, mask=valid)
        tl.store(incl_ptr + 3 * NB + b, s, mask=valid)
        tl.store(incl_ptr + 4 * NB + b, v1, mask=valid)
        tl.store(incl_ptr + 5 * NB + b, v2, mask=valid)
        tl.store(incl_ptr + 6 * NB + b, v3, mask=valid)
        # padded lanes are identities, so the last lane holds the carry
        c_fs = _last(fs, CB)
        c_fg = _last(fg, CB)
        c_m = _last(m, CB)
        c_s = _last(s, CB)
        c_1 = _last(v1, CB)
        c_2 = _last(v2, CB)
        c_3 = _last(v3, CB)


@triton.jit
def _scan_apply_kernel(risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, gstart_ptr, sstart_ptr, start_ptr,
                       stats_ptr, sums_ptr, g_ptr, incl_ptr, out_ptr, N, NB,
                       MODE: tl.constexpr, REVERSE: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_STRATA: tl.constexpr, EFRON: tl.constexpr, G_VEC: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = _offsets(pid, BLOCK, REVERSE)
    valid = offs < N
    st = _state(offs, valid, N, risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, gstart_ptr, sstart_ptr, start_ptr,
                stats_ptr, sums_ptr, g_ptr, MODE, HAS_W, HAS_STRATA, EFRON, G_VEC, ACC)
    fs, fg, m, s, v1, v2, v3 = tl.associative_scan(st, 0, _combine)
    if REVERSE:
        prev = pid + 1
    else:
        prev = pid - 1
    has = (prev >= 0) & (prev < NB)
    c_fs = tl.load(incl_ptr + 0 * NB + prev, mask=has, other=0.0).to(tl.int32)
    c_fg = tl.load(incl_ptr + 1 * NB + prev, mask=has, other=0.0).to(tl.int32)
    c_m = tl.load(incl_ptr + 2 * NB + prev, mask=has, other=NEG)
    c_s = tl.load(incl_ptr + 3 * NB + prev, mask=has, other=0.0)
    c_1 = tl.load(incl_ptr + 4 * NB + prev, mask=has, other=0.0)
    c_2 = tl.load(incl_ptr + 5 * NB + prev, mask=has, other=0.0)
    c_3 = tl.load(incl_ptr + 6 * NB + prev, mask=has, other=0.0)
    fs, fg, m, s, v1, v2, v3 = _combine(c_fs, c_fg, c_m, c_s, c_1, c_2, c_3, fs, fg, m, s, v1, v2, v3)
    if MODE == 0:
        pos = s > 0
        log_s = tl.where(pos, m + tl.log(tl.where(pos, s, 1.0)), NEG)
        rho = tl.where(pos, tl.minimum(v1 / tl.where(pos, s, 1.0), 1.0), 0.0)
        tl.store(stats_ptr + offs, log_s, mask=valid)
        tl.store(stats_ptr + N + offs, rho, mask=valid)
        tl.store(stats_ptr + 2 * N + offs, v2, mask=valid)
        tl.store(stats_ptr + 3 * N + offs, v3, mask=valid)
    elif MODE == 1:
        tl.store(sums_ptr + offs, v1, mask=valid)
        tl.store(sums_ptr + N + offs, v2, mask=valid)
        tl.store(sums_ptr + 2 * N + offs, v3, mask=valid)
    elif MODE == 2:
        tl.store(out_ptr + offs, v1, mask=valid)
    else:
        idx, eta, w, e, ev = _load_row(offs, valid, risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, HAS_W, ACC)
        j = tl.load(start_ptr + offs, mask=valid, other=0)
        log_sg = tl.load(stats_ptr + j, mask=valid, other=0.0)
        b_g = tl.load(sums_ptr + N + j, mask=valid, other=0.0)
        q_g = tl.load(sums_ptr + 2 * N + j, mask=valid, other=0.0)
        if G_VEC:
            g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(ACC)
        else:
            g = tl.load(g_ptr).to(ACC)
        live = valid & (w > 0)
        eta_l = tl.where(live, eta, 0.0)
        # every exponent is <= 0 on live rows: a risk-set member never exceeds its own sum
        risk_part = w * tl.exp(tl.where(live, eta_l + m, NEG)) * s
        tie_part = tl.where(ev, w * tl.exp(tl.where(ev, eta_l - log_sg, NEG)) * q_g * b_g, 0.0)
        own = tl.where(e, w * g, 0.0)
        grad = tl.where(live, risk_part - tie_part - own, 0.0)
        tl.store(out_ptr + idx, grad.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _loss_kernel(risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, start_ptr, stats_ptr, usum_ptr, out_ptr, N, NB,
                 HAS_W: tl.constexpr, EFRON: tl.constexpr, REDUCE: tl.constexpr,
                 ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    idx, eta, w, e, ev = _load_row(offs, valid, risk_ptr, shift_ptr, perm_ptr, w_ptr, ev_ptr, HAS_W, ACC)
    j = tl.load(start_ptr + offs, mask=valid, other=0)
    log_sg = tl.load(stats_ptr + j, mask=ev, other=0.0)
    d_g = tl.load(stats_ptr + 2 * N + j, mask=ev, other=1.0)
    d_g = tl.where(d_g > 0, d_g, 1.0)
    base = tl.where(ev, w * (log_sg - tl.where(ev, eta, 0.0)), 0.0)
    if REDUCE:
        if EFRON:
            rho = tl.load(stats_ptr + N + j, mask=ev, other=0.0)
            w_g = tl.load(stats_ptr + 3 * N + j, mask=ev, other=0.0)
            r = tl.load(stats_ptr + 2 * N + offs, mask=valid, other=0.0) - ev.to(ACC)
            u = tl.where(ev, tl.log(1.0 - r * rho / d_g), 0.0)
            base += tl.where(ev, w_g / d_g * u, 0.0)
        tl.store(out_ptr + pid, tl.sum(base, axis=0))
        tl.store(out_ptr + NB + pid, tl.sum(tl.where(ev, w, 0.0), axis=0))
    else:
        if EFRON:
            u_g = tl.load(usum_ptr + j, mask=ev, other=0.0)
            base += tl.where(ev, w * u_g / d_g, 0.0)
        tl.store(out_ptr + idx, base, mask=valid)


# ----------------------------------------------------------------------------------------------
# launchers

def _acc_dtype(risk: torch.Tensor):
    return (tl.float64, torch.float64) if risk.dtype == torch.float64 else (tl.float32, torch.float32)


def _shift(risk: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    acc = _acc_dtype(risk)[1]
    live = risk.detach().to(acc)
    if weight is not None:
        live = torch.where(weight > 0, live, torch.full_like(live, -torch.inf))
    top = live.max().reshape(1)
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def default_block(n: int, device: torch.device, acc: torch.dtype = torch.float32) -> int:
    """Subjects per program: on a GPU the largest power of two in [256, 2048] (1024 for fp64)
    that still gives >= 2 blocks per multiprocessor (n = 65,536: 256 blocks on 132 SMs, not 64);
    128 in the interpreter."""
    sms = multiprocessors(device)
    if sms is None:
        return 128
    top = 1024 if acc == torch.float64 else 2048
    block = 256
    while block < top and triton.cdiv(n, 2 * block) >= 2 * sms:
        block *= 2
    return block


def _warps(block: int, acc: torch.dtype) -> int:
    """Warps per program: 4 to 8, at most 4 (fp64) or 8 (fp32) subjects per thread, so the
    7-value scan state of each subject stays in registers."""
    per_thread = 4 if acc == torch.float64 else 8
    return max(4, min(8, block // (32 * per_thread)))


def _sorted(x: torch.Tensor | None, perm: torch.Tensor) -> torch.Tensor | None:
    """One gather into sorted order, contiguous (every scan pass then reads it coalesced)."""
    return None if x is None else x.index_select(0, perm)


def _scan(mode: int, reverse: bool, tensors: dict, n: int, block: int, flags: dict,
          out: torch.Tensor | None = None) -> None:
    nb = triton.cdiv(n, block)
    acc_tl, acc_torch = flags["ACC"], tensors["acc_torch"]
    agg = torch.empty(7, nb, device=tensors["perm"].device, dtype=acc_torch)
    incl = torch.empty_like(agg)
    args = (tensors["risk"], tensors["shift"], tensors["perm"], tensors["w"], tensors["ev"], tensors["gstart"],
            tensors["sstart"], tensors["start"], tensors["stats"], tensors["sums"], tensors["g"])
    meta = dict(MODE=mode, REVERSE=reverse, HAS_W=flags["HAS_W"], HAS_STRATA=flags["HAS_STRATA"],
                EFRON=flags["EFRON"], G_VEC=flags.get("G_VEC", False), ACC=acc_tl, BLOCK=block)
    warps = _warps(block, acc_torch)
    _scan_aggregate_kernel[(nb,)](*args, agg, n, nb, num_warps=warps,
                                 enable_fp_fusion=FP_FUSION, **meta)
    record("cox_ph_loss.scan_aggregate")
    # padded lanes of the carry scan are identities, so a minimum width costs nothing
    cb = (min(1024, max(32, triton.next_power_of_2(nb))) if multiprocessors(tensors["perm"].device)
          else min(64, triton.next_power_of_2(nb)))
    _scan_carry_kernel[(1,)](agg, incl, nb, REVERSE=reverse, ACC=acc_tl, CB=cb, num_warps=4,
                             enable_fp_fusion=FP_FUSION)
    record("cox_ph_loss.scan_carry")
    _scan_apply_kernel[(nb,)](*args, incl, out if out is not None else tensors["stats"], n, nb,
                              num_warps=warps, enable_fp_fusion=FP_FUSION, **meta)
    record("cox_ph_loss.scan_apply")


def cox_forward(risk: torch.Tensor, perm: torch.Tensor, weight: torch.Tensor | None, event: torch.Tensor,
                gstart: torch.Tensor, sstart: torch.Tensor | None, start_of: torch.Tensor,
                efron: bool, reduce: bool, block: int | None = None):
    """Forward launches. Returns (loss_or_terms, event_weight_total_or_None, stats (4, N)).

    ``risk`` (N,) any float dtype, original order; ``perm`` (N,) int64 sorted position ->
    row; ``weight`` (N,) float or None; ``event`` (N,) uint8/bool; ``gstart``/``sstart`` (N,) uint8
    in sorted order (first member of a tie group / stratum); ``start_of`` (N,) int64, sorted
    position of the first member of each subject's group. ``reduce``: summed loss (fp32/fp64 0-d)
    else per-row terms (N,) in the accumulation dtype.
    """
    n = risk.numel()
    acc_tl, acc_torch = _acc_dtype(risk)
    block = block or default_block(n, risk.device, acc_torch)
    stats = torch.empty(4, n, device=risk.device, dtype=acc_torch)
    risk_s, w_s, ev_s = _sorted(risk, perm), _sorted(weight, perm), _sorted(event, perm)
    t = dict(risk=risk_s, shift=_shift(risk, weight), perm=perm, w=w_s if w_s is not None else risk_s, ev=ev_s,
             gstart=gstart, sstart=sstart if sstart is not None else gstart, start=start_of, stats=stats, sums=stats,
             g=stats, acc_torch=acc_torch)
    flags = dict(ACC=acc_tl, HAS_W=weight is not None, HAS_STRATA=sstart is not None, EFRON=efron)
    _scan(MODE_STATS, True, t, n, block, flags)
    nb = triton.cdiv(n, block)
    usum = stats
    if efron and not reduce:
        usum = torch.empty(n, device=risk.device, dtype=acc_torch)
        _scan(MODE_EFRON, True, t, n, block, flags, out=usum)
    out = torch.empty(2 * nb if reduce else n, device=risk.device, dtype=acc_torch)
    _loss_kernel[(nb,)](risk_s, t["shift"], perm, t["w"], ev_s, start_of, stats, usum, out, n, nb,
                        HAS_W=weight is not None, EFRON=efron, REDUCE=reduce, ACC=acc_tl, BLOCK=block,
                        num_warps=_warps(block, acc_torch), enable_fp_fusion=FP_FUSION)
    record("cox_ph_loss.loss")
    if reduce:
        return out[:nb].sum(), out[nb:].sum(), stats
    return out, None, stats


def cox_backward(risk: torch.Tensor, perm: torch.Tensor, weight: torch.Tensor | None, event: torch.Tensor,
                 gstart: torch.Tensor, sstart: torch.Tensor | None, start_of: torch.Tensor,
                 stats: torch.Tensor, grad: torch.Tensor, per_row: bool, efron: bool,
                 block: int | None = None) -> torch.Tensor:
    """d loss / d risk in risk's dtype and row order.

    ``grad`` is the upstream gradient per event term: a 1-element tensor (sum/mean, already
    divided by the event weight for mean; ``per_row=False``) or an (N,) tensor in row order
    (reduction='none'; ``per_row=True``).
    """
    n = risk.numel()
    acc_tl, acc_torch = _acc_dtype(risk)
    block = block or default_block(n, risk.device, acc_torch)
    sums = torch.empty(3, n, device=risk.device, dtype=acc_torch)
    g = grad.to(acc_torch).contiguous()
    if per_row:
        g = _sorted(g, perm)
    risk_s, w_s, ev_s = _sorted(risk, perm), _sorted(weight, perm), _sorted(event, perm)
    t = dict(risk=risk_s, shift=_shift(risk, weight), perm=perm, w=w_s if w_s is not None else risk_s, ev=ev_s,
             gstart=gstart, sstart=sstart if sstart is not None else gstart, start=start_of, stats=stats, sums=sums,
             g=g, acc_torch=acc_torch)
    flags = dict(ACC=acc_tl, HAS_W=weight is not None, HAS_STRATA=sstart is not None, EFRON=efron,
                 G_VEC=per_row)
    _scan(MODE_BWD, True, t, n, block, flags, out=sums)
    out = torch.empty_like(risk)
    _scan(MODE_GRAD, False, t, n, block, flags, out=out)
    return out
