"""Run lungcore's benchmarks: one table per op, plus JSON, Markdown and PNG plots.

    python -m benchmarks.run [--only NAME ...] [--device cpu|cuda] [--quick] [--out DIR]

Every ``benchmarks/bench_*.py`` module is discovered (see ``benchmarks/harness.py`` for what a
module defines; a module may instead define ``run_results(device, quick, out) -> list[Result]``
when it times whole passes itself, as ``bench_cohort_scale.py`` does). Results go to ``benchmarks/results/<device>-<date>/`` by default (committed runs
keep the device name, date and commit in ``results.json``); ``--out`` writes elsewhere (the demo
writes under ``runs/``, which git ignores).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.harness import Result, run_case

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Names of the benchmark modules (``bench_<name>.py``), sorted."""
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """The commit measured: ``LUNGCORE_COMMIT`` when set (a copy of the tree without .git, as on
    the GPU machine), else ``git rev-parse`` (+ ``-dirty``)."""
    if os.environ.get("LUNGCORE_COMMIT"):
        return os.environ["LUNGCORE_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=HERE, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=HERE).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: list[Result]) -> str:
    """One row per (shape, provider); "floor ms" and "% of floor" columns (floor / median), named by
    the GPU whose ceilings the floor is over, when any result has a floor (CUDA runs of the ops that
    ``benchmarks.floors`` covers, on a GPU it has ceilings for)."""
    gpus = sorted({r.floor_gpu or "?" for r in results if r.floor_ms is not None})
    head = "| op | shape | provider | median ms | speedup | vs | peak MiB |"
    rule = "|---|---|---|---:|---:|---|---:|"
    if gpus:
        gpu = "/".join(g.upper() for g in gpus)
        head += f" {gpu} floor ms | % of floor |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in results:
        line = (f"| {r.op} | {r.shape} | {r.provider} | {_fmt(r.median_ms, '.3f')} | "
                f"{_fmt(r.speedup, '.2f')}x | {r.baseline} | {_fmt(r.peak_mb, '.1f')} |")
        if gpus:
            line += f" {_fmt(r.floor_ms, '.4f')} | {_fmt(r.pct_of_floor, '.1f')} |"
        lines.append(line)
    return "\n".join(lines)


def merge_results(path: Path, meta: dict, results: list[Result]) -> dict:
    """This run's results merged into ``path``'s: ops run now replace their old rows, others stay.

    One folder per device and date then holds every op even when they were run one at a time;
    each op keeps the meta (commit, versions) of the run that measured it.
    """
    merged: dict = {"device_name": meta["device_name"], "device": meta["device"], "runs": {}, "results": []}
    if path.exists():
        old = json.loads(path.read_text())
        if "runs" in old and old.get("device_name") == meta["device_name"]:
            merged = old
        elif "meta" in old and old["meta"].get("device_name") == meta["device_name"]:  # one-run format
            ops = sorted({r["op"] for r in old["results"]})
            merged["runs"] = {op: old["meta"] for op in ops}
            merged["results"] = old["results"]
    ops_now = {r.op for r in results}
    merged["results"] = [r for r in merged["results"] if r["op"] not in ops_now] + [asdict(r) for r in results]
    merged["runs"].update({op: meta for op in ops_now})
    return merged


def results_markdown(merged: dict) -> str:
    lines = [f"# lungcore benchmarks on {merged['device_name']} ({merged['device']})", "",
             "Speedup = baseline median / provider median, measured in the same run.", ""]
    for op, meta in sorted(merged["runs"].items()):
        rows = [Result(**r) for r in merged["results"] if r["op"] == op]
        lines += [f"## {op}", "",
                  f"date {meta['date']}; commit {meta['commit']}; torch {meta['torch']}; triton {meta.get('triton')}; "
                  f"threads {meta.get('threads')}; quick {meta.get('quick')}", "", markdown_table(rows), ""]
    return "\n".join(lines)


def plot(op: str, results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    providers = list(dict.fromkeys(r.provider for r in results))
    sized = all(r.size is not None for r in results)
    shapes = list(dict.fromkeys(r.shape for r in results))
    for p in providers:
        rows = [r for r in results if r.provider == p]
        xs = [r.size if sized else shapes.index(r.shape) for r in rows]
        ax.plot(xs, [r.median_ms for r in rows], marker="o", label=p)
    if sized:
        ax.set_xscale("log")
        ax.set_xlabel("size")
    else:
        ax.set_xticks(range(len(shapes)), shapes, rotation=20, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    names = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=names, help="run only these benchmarks")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds, for smoke tests)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<device>-<date>)")
    parser.add_argument("--budget", type=float, default=2.0, help="CPU timing budget per provider, seconds")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    dev_name = device_name(device)
    today = _dt.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")[:40]
    out = args.out or HERE / "results" / f"{slug}-{today}{'-quick' if args.quick else ''}"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device, "device_name": dev_name, "date": today, "commit": git_commit(),
        "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick,
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(f"lungcore benchmarks on {dev_name} ({device}), commit {meta['commit']}, {today}")

    for name in args.only or names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        op = getattr(module, "NAME", name)
        results: list[Result] = []
        if hasattr(module, "run_results"):  # a benchmark that times whole passes itself (cohort_scale)
            results.extend(module.run_results(device, args.quick, out))
        for case in module.cases(device, args.quick):
            results.extend(run_case(op, case, device, budget_s=args.budget))
        print(f"\n## {op}\n{markdown_table(results)}", flush=True)
        plot(op, results, out / f"{op}.png", f"{op} on {dev_name}")
        # written after every op, so a run stopped part-way (a device call's time limit) keeps
        # what it measured
        merged = merge_results(out / "results.json", meta, results)
        (out / "results.json").write_text(json.dumps(merged, indent=1))
        (out / "results.md").write_text(results_markdown(merged))
    print(f"\nwrote {out}/results.json, results.md and one PNG per op")
    return 0


if __name__ == "__main__":
    sys.exit(main())
