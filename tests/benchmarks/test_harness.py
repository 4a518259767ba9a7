"""The benchmark harness writes its table, JSON, Markdown and PNG; speedups are same-run ratios."""
from __future__ import annotations

import json
import types

from benchmarks import run as bench_run
from benchmarks.harness import Case, run_case


def test_run_case_checks_then_times(monkeypatch):
    """The check runs before any timing; medians, repeats and speedups are exactly what a clock
    that each provider advances by a known step gives (no real timing: the test cannot flake)."""
    from benchmarks import harness

    now = [0.0]
    events: list[str] = []

    def provider(name: str, seconds: float):
        def call():
            events.append(name)
            now[0] += seconds  # powers of two: every sum and difference below is exact
        return call

    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    case = Case(shape="n=1", providers={"eager": provider("eager", 4 / 256), "fast": provider("fast", 1 / 256)},
                check=lambda: events.append("checked"))
    results = run_case("toy", case, "cpu", budget_s=0.05)
    # one warm-up call each, then rounds of both until 2 x 50 ms have passed: 5/256 s a round -> 6 rounds
    assert events == ["checked", "eager", "fast"] + ["eager", "fast"] * 6
    by = {r.provider: r for r in results}
    assert (by["eager"].median_ms, by["fast"].median_ms) == (4 / 256 * 1e3, 1 / 256 * 1e3)
    assert (by["eager"].repeats, by["fast"].repeats) == (6, 6)
    assert (by["eager"].speedup, by["fast"].speedup) == (1.0, 4.0)


def test_concordance_benchmark_writes_outputs(tmp_path):
    assert "concordance" in bench_run.discover()
    assert bench_run.main(["--only", "concordance", "--quick", "--device", "cpu", "--budget", "0.05",
                           "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["device"] == "cpu" and data["runs"]["concordance"]["commit"]
    providers = {r["provider"] for r in data["results"]}
    assert {"lungcore", "lifelines"} <= providers
    assert (tmp_path / "concordance.png").stat().st_size > 1000
    assert "| concordance |" in (tmp_path / "results.md").read_text()


def test_runs_of_single_ops_accumulate_in_one_folder(tmp_path):
    from benchmarks.harness import Result

    meta = {"device": "cpu", "device_name": "toy cpu", "date": "2026-01-01", "commit": "abc", "torch": "x"}
    first = [Result("a", "n=1", "eager", 1.0, 1.0, None, 3, 1, "eager")]
    second = [Result("b", "n=1", "eager", 2.0, 1.0, None, 3, 1, "eager")]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(bench_run.merge_results(path, meta, first)))
    merged = bench_run.merge_results(path, dict(meta, commit="def"), second)
    assert {r["op"] for r in merged["results"]} == {"a", "b"}
    assert merged["runs"]["a"]["commit"] == "abc" and merged["runs"]["b"]["commit"] == "def"
    rerun = bench_run.merge_results(path, meta, [Result("a", "n=1", "eager", 5.0, 1.0, None, 3, 1, "eager")])
    assert [r["median_ms"] for r in rerun["results"] if r["op"] == "a"] == [5.0]
    assert "## a" in bench_run.results_markdown(merged) and "## b" in bench_run.results_markdown(merged)
