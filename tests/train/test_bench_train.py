"""benchmarks/bench_train.py builds its cases, checks fused == reference losses and runs a step each."""
from __future__ import annotations

from benchmarks import bench_train


def test_bench_train_quick_cpu_cases_run():
    cases = bench_train.cases("cpu", quick=True)
    assert len(cases) == 3
    for case in cases:
        case.check()
        for fn in case.providers.values():
            assert bool(fn().isfinite())
