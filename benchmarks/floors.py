"""Floors: the least time an op can take on an H200, from the bytes it must move and the FLOPs it must do.

    python -m benchmarks.floors [--out FILE]     # the table for every op at its CUDA benchmark shapes

For each op and benchmark shape: the bytes that must cross device memory (every input read once,
every output written once; no intermediate, no re-read) and the arithmetic that must be done,
each over the H200's measured ceiling; the larger time is the floor (METHOD.md, "Two numbers
first"). ``benchmarks.run --device cuda`` prints each measured time as a % of its floor
(floor / measured: 100 % = at the floor).

Ceilings (``RATES``): memory 4.3 TB/s (a large device-to-device copy through PyTorch, bytes read
+ written, measured on this workplace's H200s); bf16/fp16 dense tensor-core 790 TFLOP/s (an
8192^3 bf16 matmul on random data, measured there); tf32 tensor-core 395 TFLOP/s (the measured
bf16 rate times the datasheet's tf32/bf16 ratio of 1/2: a lead, not a reading); fp32 without
tensor cores 67 TFLOP/s and fp64 34 TFLOP/s (datasheet leads, H200.md). The benchmarks run bf16
on CUDA for attention and patch embedding, fp32 for the Cox loss and the resampler.

What the counts leave out, deliberately: the Cox loss's sort (the floor is the loss's own I/O:
an exact method must also sort, and ``bench_cox`` times ``torch.sort`` alone as that yardstick);
attention's softmax exponentials (special-function unit, not counted as FLOPs) and key-mask
sparsity (counted dense, as every tiled kernel computes it); the resampler's index arithmetic
(counted as 20 FLOPs per trilinear sample and 200 per cubic one: far below its bytes either way).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

RATES = {
    "hbm": 4.3e12,        # bytes/s, measured (device copy, read + write)
    "bf16-tc": 790e12,    # FLOP/s, measured (dense bf16 matmul, random data)
    "fp16-tc": 790e12,    # same tensor-core rate as bf16 (datasheet parity)
    "tf32-tc": 395e12,    # measured bf16 x datasheet tf32/bf16 ratio (1/2)
    "fp32": 67e12,        # datasheet, no tensor cores
    "fp64": 34e12,        # datasheet, no tensor cores
}


@dataclass(frozen=True)
class Floor:
    """Bytes and FLOPs one call must move and do, and the floor time they imply on an H200."""

    op: str
    shape: str
    bytes: int
    flops: int
    unit: str               # key of RATES the FLOPs run on

    @property
    def memory_us(self) -> float:
        return self.bytes / RATES["hbm"] * 1e6

    @property
    def compute_us(self) -> float:
        return self.flops / RATES[self.unit] * 1e6

    @property
    def floor_us(self) -> float:
        return max(self.memory_us, self.compute_us)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_us >= self.compute_us else "compute"

    def percent_of(self, measured_ms: float) -> float:
        """Floor / measured, in %: 100 means the measured time is the floor."""
        return 100.0 * self.floor_us / (measured_ms * 1e3)


_TC = {2: "bf16-tc", 4: "tf32-tc"}


def attention(b: int, h: int, lq: int, lk: int, d: int, backward: bool, itemsize: int = 2,
              shape: str | None = None) -> Floor:
    """Masked cross-attention: q, k, v (and dO) read, out (and dq, dk, dv) written, the key mask read.

    FLOPs: forward 2 GEMMs (QK^T, PV) = 4 B H Lq Lk D; backward 4 more (dV, dP, dQ, dK) = 8 B H Lq Lk D
    (recomputing P, as flash kernels do, is a choice, not counted).

    Example:
        >>> attention(32, 8, 512, 16, 32, backward=False).bound
        'memory'
    """
    q = b * h * lq * d
    kv = b * h * lk * d
    elems = (q + 2 * kv + q) if not backward else (2 * q + 2 * kv + q + q + 2 * kv)   # +dO; +out, dq, dk, dv
    nbytes = elems * itemsize + b * lk
    flops = (4 if not backward else 12) * b * h * lq * lk * d
    return Floor("attention", shape or f"B={b} H={h} Lq={lq} Lk={lk} D={d} {'fwd+bwd' if backward else 'fwd'}",
                 nbytes, flops, _TC[itemsize])


def patch_embed(B: int, C: int, spatial: tuple[int, int, int], patch: tuple[int, int, int], E: int, ratio: float,
                backward: bool, itemsize: int = 2, shape: str | None = None) -> Floor:
    """Patch embedding with visible-token gather: the visible patches, weight, bias, the position rows
    used and the visible indices read, the tokens written; backward (weight, bias, position
    gradients, as the benchmark asks) adds dOut read and dW, dbias, dpos written.

    FLOPs: 2 M K E forward (M = B T rows, K = C * prod(patch)), 2 M K E more for dW.

    Example:
        >>> patch_embed(16, 1, (32, 128, 128), (4, 16, 16), 256, 1.0, backward=False).bound
        'memory'
    """
    n = math.prod(s // p for s, p in zip(spatial, patch))
    t = max(1, round(ratio * n))
    m = B * t
    k = C * math.prod(patch)
    pos_rows = min(n, m)
    elems = m * k + E * k + E + pos_rows * E + m * E
    idx = 0 if ratio == 1.0 else 8 * m
    flops = 2 * m * k * E
    if backward:
        elems += m * E + E * k + E + n * E
        flops += 2 * m * k * E + 2 * m * E
    label = (f"B={B} {C}x{'x'.join(map(str, spatial))} p={'x'.join(map(str, patch))} E={E} ratio={ratio} "
             f"{'fwd+bwd' if backward else 'fwd'}")
    return Floor("patch_embed", shape or label, elems * itemsize + idx, flops, _TC[itemsize])


def cox(n: int, risk_itemsize: int = 4, time_itemsize: int = 4, shape: str | None = None) -> Floor:
    """Cox loss forward + backward: risk, time, event read, d loss / d risk written (the sort excluded).

    FLOPs: about 10 per subject (an exponential, a few multiply-adds, a log per tie group), fp32.

    Example:
        >>> cox(65_536).bytes
        851968
    """
    return Floor("cox", shape or f"n={n:,} fwd+bwd", n * (2 * risk_itemsize + time_itemsize + 1), 10 * n, "fp32")


def resample(in_shape: tuple[int, int, int], out_shape: tuple[int, int, int], in_itemsize: int, out_itemsize: int,
             order: int, shape: str | None = None) -> Floor:
    """Whole-volume resampling: the input read once, the output written once.

    Example:
        >>> resample((160, 512, 512), (400, 358, 358), 4, 4, 1).bound
        'memory'
    """
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    per = 20 if order == 1 else 200
    label = shape or f"{'x'.join(map(str, in_shape))} -> {'x'.join(map(str, out_shape))} order {order}"
    return Floor("resample", label, n_in * in_itemsize + n_out * out_itemsize, per * n_out, "fp32")


def resample_crops(n_boxes: int, size: tuple[int, int, int], old: tuple[float, ...], new: tuple[float, ...],
                   in_itemsize: int, out_itemsize: int, shape: str | None = None) -> Floor:
    """Fused resample + window + crop: each box's input footprint read once, the boxes written once."""
    footprint = math.prod(math.ceil(s * nw / o) + 1 for s, nw, o in zip(size, new, old))
    n_out = n_boxes * math.prod(size)
    label = shape or f"{n_boxes} boxes {'x'.join(map(str, size))}"
    return Floor("resample", label, n_boxes * footprint * in_itemsize + n_out * out_itemsize, 22 * n_out, "fp32")


def cuda_floors() -> list[Floor]:
    """The floor of every op at each of its CUDA benchmark shapes (the shapes come from the
    benchmark modules themselves, so the table follows them)."""
    from benchmarks import bench_attention, bench_cox, bench_patch_embed, bench_resample

    out: list[Floor] = []
    for label, (b, h, lq, lk, d) in bench_attention.shapes("cuda", quick=False):
        for backward in (False, True):
            out.append(attention(b, h, lq, lk, d, backward,
                                 shape=f"{label} B={b} H={h} Lq={lq} Lk={lk} D={d} {'fwd+bwd' if backward else 'fwd'}"))
    for label, B, C, spatial, patch, E in bench_patch_embed.shapes("cuda", quick=False):
        for ratio in (1.0, 0.25):
            for backward in (False, True):
                f = patch_embed(B, C, spatial, patch, E, ratio, backward)
                out.append(Floor(f.op, f"{label} {f.shape}", f.bytes, f.flops, f.unit))
    for n in bench_cox.sizes("cuda", quick=False):
        out.append(cox(n))
    out += bench_resample.floors("cuda", quick=False)
    return out


def markdown(floors: list[Floor]) -> str:
    lines = ["# Floors on an H200 (bytes and FLOPs every call must move and do)", "",
             "`python -m benchmarks.floors`. Ceilings: "
             + ", ".join(f"{k} {v / 1e12:g} {'TB/s' if k == 'hbm' else 'TFLOP/s'}" for k, v in RATES.items())
             + " (see the module docstring for which are measured). Floor = max(bytes / bandwidth, "
             "FLOPs / rate); `benchmarks.run --device cuda` reports measured times as % of these.", "",
             "| op | shape | MB moved | GFLOP | unit | memory µs | compute µs | floor µs | bound |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for f in floors:
        lines.append(f"| {f.op} | {f.shape} | {f.bytes / 1e6:.2f} | {f.flops / 1e9:.3f} | {f.unit} | "
                     f"{f.memory_us:.2f} | {f.compute_us:.2f} | {f.floor_us:.2f} | {f.bound} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "floors-h200.md",
                        help="Markdown file to write (default benchmarks/results/floors-h200.md)")
    args = parser.parse_args(argv)
    text = markdown(cuda_floors())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
