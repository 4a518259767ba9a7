"""Timing harness shared by every ``benchmarks/bench_*.py`` module.

A benchmark module defines

    NAME = "concordance"                 # the op, used by ``--only``
    def cases(device: str, quick: bool) -> list[Case]: ...

Each :class:`Case` is one input shape with several providers (callables taking no argument),
one of which is the baseline that speedups are quoted against ("eager" for kernels, the peer
library where there is no eager PyTorch equivalent). Providers that are unavailable on a machine
are simply left out of the dict (never faked). ``check`` (optional) verifies that the providers
agree before anything is timed, so a fast wrong answer is never reported.

Timing: on CUDA ``triton.testing.do_bench`` (median, ms); on CPU a warm-up call each, then the
providers timed round-robin (so a shared machine's load drift hits them alike) and the median of
the repeats within a time budget. On CUDA each result also carries the case's floor on the GPU it ran on
(``Case.floor``, from ``benchmarks.floors``; none for a GPU without measured ceilings there) and the
measured time as a % of it. Peak memory: CUDA max allocated; on CPU tracemalloc is not
meaningful for torch, so it is reported as None. Ratios are only quoted within one run.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Case:
    """One benchmark input: a label, its size for plots, and the providers to time."""

    shape: str
    providers: dict[str, Callable[[], Any]]
    baseline: str = "eager"
    size: float | None = None          # x-axis value for the plots (e.g. n subjects, tokens)
    check: Callable[[], None] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # FLOPs, bytes, ... for the table
    floor: Any = None                  # benchmarks.floors.Floor of this shape, or None


@dataclass
class Result:
    op: str
    shape: str
    provider: str
    median_ms: float
    speedup: float | None              # baseline median / this median, same run
    peak_mb: float | None
    repeats: int
    size: float | None
    baseline: str
    note: str = ""
    floor_ms: float | None = None      # the case's floor on the GPU measured (benchmarks.floors), CUDA runs only
    pct_of_floor: float | None = None  # floor / median, in % (100 = at the floor)
    floor_gpu: str | None = None       # the benchmarks.floors.CEILINGS key the floor is over ("h100", "h200")


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 HU volume (z, y, x) for benchmarks: air outside a body ellipse, soft tissue,
    two lungs, Gaussian noise (30 HU)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    yy, xx = (y - shape[1] / 2) / (shape[1] * 0.42), (x - shape[2] / 2) / (shape[2] * 0.45)
    body = yy ** 2 + xx ** 2 < 1
    lungs = ((yy ** 2 + ((np.abs(xx) - 0.45) / 0.35) ** 2) < 0.5) & body
    ct = np.where(body, 40, -1000) + np.where(lungs, -830, 0) + np.zeros_like(z)
    return (ct + rng.normal(scale=30, size=shape)).astype(np.int16)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cpu_interleaved(providers: dict[str, Callable[[], Any]], budget_s: float = 2.0,
                         min_repeats: int = 3, max_repeats: int = 50) -> dict[str, tuple[float, int]]:
    """(median ms, repeats) per provider on CPU, timed round-robin after one warm-up call each.

    Interleaving the providers spreads the load of a shared machine evenly over them, so the
    ratios of one run stay meaningful even when absolute times drift.
    """
    for fn in providers.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in providers}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start < budget_s * len(providers)):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: (statistics.median(ts), len(ts)) for name, ts in times.items()}


def time_cuda(fn: Callable[[], Any]) -> tuple[float, int]:
    """(median ms, repeats) with ``triton.testing.do_bench`` (it flushes L2 between calls)."""
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return float(ms), 0


def floor_gpu(device: str) -> str | None:
    """The ``benchmarks.floors.CEILINGS`` key of the GPU that ``device`` times run on, or None (a CPU,
    or a GPU without measured ceilings)."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    from benchmarks.floors import gpu_key

    return gpu_key(torch.cuda.get_device_name(0))


def run_case(op: str, case: Case, device: str, budget_s: float = 2.0) -> list[Result]:
    """Check then time every provider of ``case``; speedups against ``case.baseline``."""
    if case.check is not None:
        case.check()
    measured: dict[str, tuple[float, int, float | None]] = {}
    if device == "cuda":
        for name, fn in case.providers.items():
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ms, reps = time_cuda(fn)
            measured[name] = (ms, reps, torch.cuda.max_memory_allocated() / 2**20)
    else:
        gc.collect()
        for name, (ms, reps) in time_cpu_interleaved(case.providers, budget_s=budget_s).items():
            measured[name] = (ms, reps, None)
    base = measured.get(case.baseline, (None,))[0]
    # a floor is a GPU's: only a time measured on a GPU with known ceilings gets a % of it
    gpu = floor_gpu(device) if case.floor is not None else None
    floor_ms = case.floor.on(gpu).floor_us / 1e3 if gpu is not None else None
    return [
        Result(op=op, shape=case.shape, provider=name, median_ms=ms,
               speedup=(base / ms) if base else None, peak_mb=peak, repeats=reps, size=case.size,
               baseline=case.baseline, note=case.note, floor_ms=floor_ms,
               pct_of_floor=100.0 * floor_ms / ms if floor_ms is not None and ms > 0 else None,
               floor_gpu=gpu if floor_ms is not None else None)
        for name, (ms, reps, peak) in measured.items()
    ]
