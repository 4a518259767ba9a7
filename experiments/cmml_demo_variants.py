"""CMML on the demo cohort: which of the model's choices moves the demo's test C-index, over seeds.

The demo (``make demo``) trains one CMML at seed 0 on 350 patients (75 test). Its C-index fell when
the T2G graph and the pretrained fusion became the defaults; this script reruns the demo's own CMML
configuration (``<demo>/cmml/config.yaml``, its cache reused) for several training seeds and each
variant, on the same splits, and reports per variant the mean and SD over seeds and the paired
difference to lungcore's default (seed by seed: same split, same initial draws where the variant
allows). For the T2G graph it also counts the edge slots (layer x head x node pair) whose gate
changed between the initial and the selected model: how far the learned topology moved.

Not CI (about a minute a run on 2 CPU cores; 25 runs by default). Usage::

    make demo                                   # once: the cohort, its cache and the CMML config
    python experiments/cmml_demo_variants.py --demo runs/demo --seeds 5

Writes ``experiments/results/cmml_demo_variants.{md,csv}``; the runs go under ``--workdir``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

VARIANTS: dict[str, dict[str, Any]] = {
    "default (T2G graph, pretrained fusion, column lr 1e-2)": {},
    "one learning rate (graph_column_lr None)": {"graph_column_lr": None},
    "dense graph": {"clinical_graph": "dense"},
    "fresh fusion": {"fusion_init": "fresh"},
    "dense graph + fresh fusion": {"clinical_graph": "dense", "fusion_init": "fresh"},
    # run settings rather than model ones ("_config": TrainConfig fields): the masked pretraining's length
    # (the demo pretrained 8 epochs before 2026-12-07, 24 since)
    "24 pretraining epochs": {"_config": {"stage_epochs": {"pretrain": 24}}},
    "24 pretraining epochs, fresh fusion": {"fusion_init": "fresh", "_config": {"stage_epochs": {"pretrain": 24}}},
    "8 pretraining epochs": {"_config": {"stage_epochs": {"pretrain": 8}}},
}
ENDPOINTS = ("pfs", "os")


def edges_changed(checkpoint: Path, seed: int) -> tuple[int, int] | None:
    """(gate changes, edge slots) of the T2G graphs between initialisation and ``checkpoint``;
    None for the dense graph. The initial model is rebuilt as ``fit`` builds it (seed, then create)."""
    from lungcore.models import create, load_model
    from lungcore.train.trainer import seed_all

    final, _ = load_model(checkpoint)
    if final.config.clinical_graph != "t2g":
        return None
    seed_all(seed)
    init = create("cmml", **dataclasses.asdict(final.config))
    changed = total = 0
    for a, b in zip(init.modules(), final.modules()):
        if hasattr(a, "edge_probability"):
            gate_a, gate_b = a.edge_probability() > 0.5, b.edge_probability() > 0.5
            changed += int((gate_a != gate_b).sum())
            total += gate_a.numel()
    return changed, total


def run_one(base: dict[str, Any], overrides: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """One training run (or the finished one already in ``out``): test C-index and graph movement."""
    from lungcore.train.loop import fit
    from lungcore.train.resume import RunFinished

    model = {k: v for k, v in overrides.items() if k != "_config"}
    cfg = {**base, "seed": seed, "progress": False, "model_overrides": {**base["model_overrides"], **model}}
    for key, value in overrides.get("_config", {}).items():   # TrainConfig fields; dicts merged one level
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    try:
        metrics = fit(cfg, out=out, resume=(out / "last.pt").is_file()).test_metrics
    except RunFinished:  # a finished run (a rerun of the script): its test report stands
        metrics = json.loads((out / "report" / "metrics.json").read_text())
    moved = edges_changed(out / "best.pt", seed)
    train_log = (out / "train.log").read_text().splitlines()
    return {"run_minutes": round(_log_minutes(train_log), 2), **{f"{e}_cindex": float(metrics[f"{e}_harrell_cindex"]) for e in ENDPOINTS},
            "edges_changed": None if moved is None else moved[0], "edge_slots": None if moved is None else moved[1]}


def _log_minutes(lines: list[str]) -> float:
    """Minutes between the first and the last time-stamped line of a run's train.log."""
    from datetime import datetime

    stamps = [datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S") for line in lines if line[:4].isdigit()]
    return (stamps[-1] - stamps[0]).total_seconds() / 60 if stamps else 0.0


def report(rows: list[dict[str, Any]], seeds: list[int], demo: Path, minutes: float, split: str) -> str:
    """The Markdown table: per variant mean (SD) and the paired difference to the default [min, max]."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    default = variants[0]
    lines = [f"# CMML on the demo cohort: variants over {len(seeds)} training seeds", "",
             f"`python experiments/cmml_demo_variants.py --demo {demo} --seeds {len(seeds)}`: the demo's CMML "
             f"configuration ({demo}/cmml/config.yaml), its split ({split}), "
             f"seeds {seeds}; {minutes:.0f} min of training ({len(rows)} runs). Test Harrell C-index; the paired difference is the variant minus "
             "the default at the same seed (mean [min, max]); edges: gate changes of the T2G graphs between "
             "initialisation and the selected model (of all layer x head x node-pair slots).", "",
             "| variant | PFS mean (SD) | OS mean (SD) | PFS - default | OS - default | edges changed |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        cells = []
        for e in ENDPOINTS:
            vals = [by[v, s][f"{e}_cindex"] for s in seeds]
            cells.append(f"{statistics.mean(vals):.3f} ({statistics.stdev(vals) if len(vals) > 1 else 0:.3f})")
        for e in ENDPOINTS:
            diff = [by[v, s][f"{e}_cindex"] - by[default, s][f"{e}_cindex"] for s in seeds]
            cells.append("-" if v == default else f"{statistics.mean(diff):+.3f} [{min(diff):+.3f}, {max(diff):+.3f}]")
        moved = [by[v, s]["edges_changed"] for s in seeds]
        slots = by[v, seeds[0]]["edge_slots"]
        cells.append("-" if moved[0] is None else f"{min(moved)}-{max(moved)} of {slots}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (PFS / OS):", "", "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(f"{by[v, s]['pfs_cindex']:.3f} / {by[v, s]['os_cindex']:.3f}"
                                              for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from lungcore.train.demo import stage_epochs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `lungcore demo --out` folder")
    p.add_argument("--seeds", type=int, default=5, help="training seeds 0 .. N-1 (default: 5)")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo_variants"), help="where the runs go")
    p.add_argument("--variants", default=None,
                   help="comma-separated indices into the variant list (default: all; the first is the reference)")
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results",
                   help="where cmml_demo_variants.md / .csv go")
    args = p.parse_args(argv)
    config = args.demo / "cmml" / "config.yaml"
    if not config.is_file():
        p.error(f"--demo {args.demo}: no {config}; run `make demo` (or `lungcore demo --out {args.demo}`) first")
    if args.seeds < 2:
        p.error(f"--seeds must be >= 2, got {args.seeds}")
    base = yaml.safe_load(config.read_text())
    # a demo folder written before the demo filtered its epochs per model holds CSF-Net's 'train' too
    base["stage_epochs"] = stage_epochs("cmml", base.get("stage_epochs") or {})
    base["data"]["cache_dir"] = str(args.demo / "cmml" / "cache")
    base["data"]["manifest"] = str(args.demo / "data" / "survival" / "manifest.csv")  # the config's is cwd-relative
    seeds = list(range(args.seeds))
    chosen = list(VARIANTS) if args.variants is None else [list(VARIANTS)[int(k)] for k in args.variants.split(",")]
    rows: list[dict[str, Any]] = []
    for k, (variant, overrides) in enumerate(VARIANTS.items()):
        if variant not in chosen:
            continue
        for seed in seeds:
            t0 = time.perf_counter()
            row = run_one(base, overrides, seed, args.workdir / f"variant{k}" / f"seed{seed}")
            rows.append({"variant": variant, "seed": seed, **row})
            print(f"{variant}, seed {seed}: PFS {row['pfs_cindex']:.3f}, OS {row['os_cindex']:.3f}, edges changed "
                  f"{row['edges_changed']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / "cmml_demo_variants.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    first = args.workdir / f"variant{list(VARIANTS).index(chosen[0])}" / "seed0" / "splits.json"
    splits = json.loads(first.read_text())
    split = " / ".join(f"{len(splits.get(k, []))} {k}" for k in ("train", "val", "test")) + " patients"
    text = report(rows, seeds, args.demo, sum(r["run_minutes"] for r in rows), split)
    (args.results / "cmml_demo_variants.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
