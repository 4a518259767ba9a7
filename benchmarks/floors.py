"""Floors: the least time an op can take on a Hopper GPU (H200 or H100), from the bytes it must move
and the FLOPs it must do.

    python -m benchmarks.floors [--gpu h200|h100 ...] [--out DIR]   # the table of every op at its CUDA shapes

For each op and benchmark shape: the bytes that must cross device memory (every input read once,
every output written once; no intermediate, no re-read) and the arithmetic that must be done,
each over the GPU's measured ceiling; the larger time is the floor (METHOD.md, "Two numbers
first"). ``benchmarks.run --device cuda`` prints each measured time as a % of the floor of the GPU
it ran on (floor / measured: 100 % = at the floor); a GPU without a row in ``CEILINGS`` gets none.

Ceilings (``CEILINGS``), per GPU. H200: memory 4.3 TB/s (a large device-to-device copy through
PyTorch, bytes read + written, measured on this workplace's H200s); bf16/fp16 dense tensor-core
790 TFLOP/s (an 8192^3 bf16 matmul on random data, measured there). H100 (SXM, HBM3, the device
tool's first kind): 3.0 TB/s and 798 TFLOP/s, the same two measurements on this workplace's H100
(2026-11-13). Both: tf32 tensor-core at half the measured bf16 rate (the datasheet's tf32/bf16
ratio: a lead, not a reading); fp32 without tensor cores 67 TFLOP/s and fp64 34 TFLOP/s (datasheet
leads, H200.md; the H100 SXM's datasheet gives the same, one GH100 die). The benchmarks run bf16
on CUDA for attention and patch embedding, fp32 for the Cox loss and the resampler.

What the counts leave out, deliberately: the Cox loss's sort (the floor is the loss's own I/O:
an exact method must also sort, and ``bench_cox`` times ``torch.sort`` alone as that yardstick);
attention's softmax exponentials (special-function unit, not counted as FLOPs) and key-mask
sparsity (counted dense, as every tiled kernel computes it); the resampler's index arithmetic
(counted as 20 FLOPs per trilinear sample and 200 per cubic one: far below its bytes either way).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rates(hbm: float, tc16: float) -> dict[str, float]:
    """One GPU's ceilings from its two measured ones (bytes/s, dense bf16 FLOP/s)."""
    return {
        "hbm": hbm,              # bytes/s, measured (device copy, read + write)
        "bf16-tc": tc16,         # FLOP/s, measured (dense bf16 matmul, random data)
        "fp16-tc": tc16,         # same tensor-core rate as bf16 (datasheet parity)
        "tf32-tc": tc16 / 2,     # measured bf16 x datasheet tf32/bf16 ratio (1/2)
        "fp32": 67e12,           # datasheet, no tensor cores
        "fp64": 34e12,           # datasheet, no tensor cores
    }


CEILINGS: dict[str, dict[str, float]] = {
    "h200": _rates(4.3e12, 790e12),
    "h100": _rates(3.0e12, 798e12),
}


def gpu_key(device_name: str) -> str | None:
    """The ``CEILINGS`` key of a CUDA device name, or None for a GPU without measured ceilings.

    Example:
        >>> gpu_key("NVIDIA H100 80GB HBM3"), gpu_key("NVIDIA H200"), gpu_key("NVIDIA A100-SXM4-80GB")
        ('h100', 'h200', None)
    """
    name = device_name.upper()
    return next((k for k in CEILINGS if k.upper() in name), None)


@dataclass(frozen=True)
class Floor:
    """Bytes and FLOPs one call must move and do, and the floor time they imply on ``gpu``.

    Example:
        >>> f = cox(65_536)
        >>> round(f.floor_us, 3), round(f.on("h100").floor_us, 3)
        (0.198, 0.284)
    """

    op: str
    shape: str
    bytes: int
    flops: int
    unit: str               # key of the ceilings the FLOPs run on
    gpu: str = "h200"       # key of CEILINGS

    def on(self, gpu: str) -> "Floor":
        """The same counts over another GPU's ceilings."""
        if gpu not in CEILINGS:
            raise ValueError(f"gpu: no ceilings for {gpu!r}; known: {', '.join(CEILINGS)}")
        return dataclasses.replace(self, gpu=gpu)

    @property
    def memory_us(self) -> float:
        return self.bytes / CEILINGS[self.gpu]["hbm"] * 1e6

    @property
    def compute_us(self) -> float:
        return self.flops / CEILINGS[self.gpu][self.unit] * 1e6

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
        >>> f = patch_embed(16, 1, (32, 128, 128), (4, 16, 16), 256, 1.0, backward=False)
        >>> f.bound, f.on("h100").bound          # the H100's slower memory tips it over
        ('compute', 'memory')
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


def markdown(floors: list[Floor], gpu: str = "h200") -> str:
    """The floors table of ``floors`` over ``gpu``'s ceilings (what ``floors-<gpu>.md`` holds)."""
    rates = CEILINGS[gpu]
    lines = [f"# Floors on an {gpu.upper()} (bytes and FLOPs every call must move and do)", "",
             f"`python -m benchmarks.floors --gpu {gpu}`. Ceilings: "
             + ", ".join(f"{k} {v / 1e12:g} {'TB/s' if k == 'hbm' else 'TFLOP/s'}" for k, v in rates.items())
             + " (see the module docstring for which are measured). Floor = max(bytes / bandwidth, "
             "FLOPs / rate); `benchmarks.run --device cuda` reports measured times as % of these.", "",
             "| op | shape | MB moved | GFLOP | unit | memory µs | compute µs | floor µs | bound |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for f in (f.on(gpu) for f in floors):
        lines.append(f"| {f.op} | {f.shape} | {f.bytes / 1e6:.2f} | {f.flops / 1e9:.3f} | {f.unit} | "
                     f"{f.memory_us:.2f} | {f.compute_us:.2f} | {f.floor_us:.2f} | {f.bound} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", nargs="+", choices=sorted(CEILINGS), default=sorted(CEILINGS),
                        help="the GPUs whose tables to write (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="folder to write floors-<gpu>.md into (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.out.suffix == ".md":
        parser.error(f"--out: a folder, not a file ({args.out}); the tables are named floors-<gpu>.md")
    floors = cuda_floors()
    args.out.mkdir(parents=True, exist_ok=True)
    for gpu in args.gpu:
        text = markdown(floors, gpu)
        path = args.out / f"floors-{gpu}.md"
        path.write_text(text)
        print(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
