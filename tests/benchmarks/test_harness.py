"""The benchmark harness writes its table, JSON, Markdown and PNG; speedups are same-run ratios."""
from __future__ import annotations

import json

from benchmarks import run as bench_run
from benchmarks.harness import Case, run_case


def test_run_case_checks_then_times():
    calls = []
    case = Case(shape="n=1", providers={"eager": lambda: sum(range(2000)), "fast": lambda: 1},
                check=lambda: calls.append("checked"))
    results = run_case("toy", case, "cpu", budget_s=0.05)
    assert calls == ["checked"]
    by = {r.provider: r for r in results}
    assert by["eager"].speedup == 1.0
    assert by["fast"].speedup > 1.0 and by["fast"].median_ms > 0


def test_concordance_benchmark_writes_outputs(tmp_path):
    assert "concordance" in bench_run.discover()
    assert bench_run.main(["--only", "concordance", "--quick", "--device", "cpu", "--budget", "0.05",
                           "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["commit"]
    providers = {r["provider"] for r in data["results"]}
    assert {"lungcore", "lifelines"} <= providers
    assert (tmp_path / "concordance.png").stat().st_size > 1000
    assert "| concordance |" in (tmp_path / "results.md").read_text()
