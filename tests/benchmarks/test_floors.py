"""H200 floors: hand-counted bytes/FLOPs, the % of floor the harness reports, the committed table."""
from __future__ import annotations

from pathlib import Path

from benchmarks import floors
from benchmarks import run as bench_run
from benchmarks.harness import Case, Result, run_case

ROOT = Path(__file__).resolve().parents[2]


def test_attention_floor_counts_by_hand():
    f = floors.attention(2, 3, 40, 8, 16, backward=False, itemsize=2)
    q, kv = 2 * 3 * 40 * 16, 2 * 3 * 8 * 16
    assert f.bytes == 2 * (q + 2 * kv + q) + 2 * 8          # q, k, v read, out written, mask bytes
    assert f.flops == 4 * 2 * 3 * 40 * 8 * 16
    b = floors.attention(2, 3, 40, 8, 16, backward=True, itemsize=2)
    assert b.flops == 3 * f.flops and b.bytes == 2 * (4 * q + 4 * kv) + 2 * 8
    assert f.unit == "bf16-tc" and floors.attention(1, 1, 8, 8, 8, False, itemsize=4).unit == "tf32-tc"


def test_floor_is_the_larger_of_memory_and_compute_time():
    mem = floors.Floor("x", "s", bytes=int(4.3e12), flops=1, unit="bf16-tc")       # 1 s of bytes
    assert abs(mem.floor_us - 1e6) < 1e-3 and mem.bound == "memory"
    comp = floors.Floor("x", "s", bytes=1, flops=int(790e12 * 2), unit="bf16-tc")  # 2 s of matmul
    assert abs(comp.floor_us - 2e6) < 1e-3 and comp.bound == "compute"
    assert abs(mem.percent_of(2000.0) - 50.0) < 1e-9                               # 2 s measured


def test_patch_embed_and_cox_floors():
    f = floors.patch_embed(2, 1, (8, 32, 32), (4, 16, 16), 64, 1.0, backward=False, itemsize=2)
    n, k, m = 2 * 2 * 2, 1024, 2 * 8
    assert f.bytes == 2 * (m * k + 64 * k + 64 + n * 64 + m * 64)
    assert f.flops == 2 * m * k * 64
    assert floors.cox(1000).bytes == 1000 * (4 + 4 + 4 + 1)


def test_cpu_results_carry_no_floor_and_the_table_shows_it_only_with_one():
    case = Case(shape="n=1", providers={"eager": lambda: 1}, floor=floors.cox(10))
    (r,) = run_case("toy", case, "cpu", budget_s=0.01)
    assert r.floor_ms is None and r.pct_of_floor is None       # H200 floors say nothing of a CPU
    assert "% of floor" not in bench_run.markdown_table([r])
    g = Result("cox", "n=10", "lungcore", 0.004, 1.0, 1.0, 5, 10, "eager", floor_ms=0.001, pct_of_floor=25.0)
    table = bench_run.markdown_table([g])
    assert "% of floor" in table and "| 25.0 |" in table


def test_committed_floors_table_is_current():
    """benchmarks/results/floors-h200.md is what `python -m benchmarks.floors` writes today."""
    committed = (ROOT / "benchmarks" / "results" / "floors-h200.md").read_text()
    assert committed == floors.markdown(floors.cuda_floors()), "rerun: python -m benchmarks.floors"
