"""The main job: ``lungcore demo --out runs/demo``.

Writes the two synthetic cohorts (``lungcore.data.synth``, preset ``demo``: real NIfTI/DICOM files),
trains CMML (masked pretraining, then Cox fine-tuning) and CSF-Net at CPU-friendly sizes, and
prints their test metrics (bootstrap 95% intervals) next to the generator's oracle on the same
test patients (the C-index of the true log-hazard, the AUC of the true logit). Each run keeps its
report folder (``<out>/cmml/report``, ``<out>/csfnet/report``); ``<out>/demo.md`` holds the table.
Rerunning resumes (finished runs are only re-evaluated). About 10 minutes on 2 CPU cores (one torch thread: these small models are
overhead-bound, and more threads than free cores slowed them 4x on a shared machine).

Example (minutes of training, so not a doctest; ``lungcore demo --quick`` is tested)::

    from lungcore.train.demo import run_demo
    table = run_demo("runs/demo")
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

CMML_SIZE = dict(patch_size=(4, 8, 8), embed_dim=64, depth=2, num_heads=4, decoder_dim=32, decoder_depth=1,
                 decoder_heads=2, clinical_dim=32, clinical_depth=1, clinical_heads=2, clinical_decoder_depth=1,
                 fusion_heads=2)
CSFNET_SIZE = dict(stem_width=4, cbam_reduction=2, stage_conv_widths=(8, 16, 32), stage_widths=(8, 16, 32),
                   stage_blocks=(1, 1, 1), clinical_embed_dim=32, dim=32, num_heads=4, global_hidden=32,
                   head_hidden=32)


def plan(quick: bool) -> dict[str, Any]:
    """Cohort sizes, crops and epochs of the demo (``quick``: a smoke test of the same path)."""
    if quick:
        return {"preset": "tiny", "n_survival": 60, "n_nodules": 60, "epochs": {"pretrain": 1, "finetune": 2,
                                                                              "train": 2},
                "cmml_crop": (8, 16, 16), "cmml_spacing": (6.0, 6.0, 6.0),
                "csf_crop": (8, 16, 16), "csf_spacing": (2.5, 1.5, 1.5), "batch_size": 16}
    return {"preset": "demo", "n_survival": 500, "n_nodules": 500,
            # 24 pretraining epochs: with 8, the pretrained fusion trailed a fresh one on these 350 patients
            # (experiments/results/cmml_demo_pretraining.md: 24 beat 8 at every seed on PFS)
            "epochs": {"pretrain": 24, "finetune": 30, "train": 30},
            "cmml_crop": (16, 32, 32), "cmml_spacing": (4.0, 3.0, 3.0),
            "csf_crop": (8, 24, 24), "csf_spacing": (2.5, 1.5, 1.5), "batch_size": 32}


def stage_epochs(model: str, epochs: dict[str, int]) -> dict[str, int]:
    """The entries of the plan's ``epochs`` (every network's stages) that are stages of ``model``:
    a config's ``stage_epochs`` may name only its own model's stages.

    Example:
        >>> stage_epochs("csfnet", plan(quick=True)["epochs"]), stage_epochs("cmml", plan(quick=True)["epochs"])
        ({'train': 2}, {'pretrain': 1, 'finetune': 2})
    """
    from lungcore.models.registry import model_class

    stages = model_class(model).stages
    return {stage: n for stage, n in epochs.items() if stage in stages}


def _cohort(kind: str, folder: Path, n: int, preset: str, seed: int) -> Path:
    from lungcore.data import synth_cohort

    start = time.perf_counter()
    result = synth_cohort(kind, folder, n=n, preset=preset, seed=seed, verbose=True, reuse=True)
    if result["reused"]:
        return folder / "manifest.csv"
    print(f"wrote {n} {kind} samples to {folder} in {time.perf_counter() - start:.0f} s "
          f"(oracle {result['oracle']})", flush=True)
    return folder / "manifest.csv"


def _oracle_on_test(kind: str, cohort: Path, run: Path) -> dict[str, float]:
    """The generator's oracle metric on exactly the test split of ``run``."""
    import pandas as pd

    from lungcore import metrics

    test_ids = set(json.loads((run / "splits.json").read_text())["test"])
    truth = pd.read_csv(cohort / "truth.csv")
    manifest = pd.read_csv(cohort / "manifest.csv")
    if kind == "survival":
        frame = manifest.merge(truth[["patient_id", "eta"]], on="patient_id")
        frame = frame[frame["patient_id"].astype(str).isin(test_ids)]
        out = {}
        for e in ("pfs", "os"):
            f = frame.dropna(subset=[f"{e}_time", f"{e}_event"])
            out[f"{e}_harrell_cindex"] = float(metrics.concordance_index(f["eta"].to_numpy(), f[f"{e}_time"].to_numpy(),
                                                                         f[f"{e}_event"].to_numpy()))
        return out
    frame = truth[truth["nodule_id"].astype(str).isin(test_ids)]
    return {"roc_auc": float(metrics.roc_auc(frame["label"].to_numpy(), frame["logit"].to_numpy()))}


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, device: str = "auto", seed: int = 0
             ) -> list[dict[str, Any]]:
    """Run the main job; returns the table rows (model, metric, value, low, high, oracle)."""
    from lungcore.train.loop import fit
    from lungcore.train.resume import RunFinished

    out = Path(out)
    p = plan(quick)
    start = time.perf_counter()
    surv = _cohort("survival", out / "data" / "survival", p["n_survival"], p["preset"], seed)
    nod = _cohort("nodules", out / "data" / "nodules", p["n_nodules"], p["preset"], seed)
    common = {"seed": seed, "device": device, "epochs": 1,
              "optim": {"lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1.0, "min_lr_ratio": 0.05},
              "data": {"batch_size": p["batch_size"], "eval_batch_size": 64, "split": [0.7, 0.15, 0.15]}}
    runs = [
        ("cmml", surv, {"model_overrides": {**CMML_SIZE, "img_size": list(p["cmml_crop"])},
                        "data": {"preprocess": {"spacing": list(p["cmml_spacing"]), "crop": list(p["cmml_crop"]),
                                                "window": [-1000.0, 400.0]}}}),
        ("csfnet", nod, {"model_overrides": dict(CSFNET_SIZE),
                         "data": {"preprocess": {"spacing": list(p["csf_spacing"]), "crop": list(p["csf_crop"])}}}),
    ]
    table: list[dict[str, Any]] = []
    for name, manifest, specific in runs:
        cfg = {**common, "model": name, "model_overrides": specific["model_overrides"],
               "stage_epochs": stage_epochs(name, p["epochs"]),
               "data": {**common["data"], **specific["data"], "manifest": str(manifest)}}
        run = out / name
        t0 = time.perf_counter()
        print(f"\n== {name}: training on {manifest}", flush=True)
        try:
            metrics = fit(cfg, out=run, resume=(run / "last.pt").is_file()).test_metrics
        except RunFinished:  # a finished run: its test report stands
            saved = json.loads((run / "report" / "metrics.json").read_text())
            metrics = {k: float("nan") if v is None else v for k, v in saved.items()}
            print(f"{run} is finished: its test metrics are in {run / 'report' / 'metrics.json'}", flush=True)
        oracle = _oracle_on_test("survival" if name == "cmml" else "nodules", manifest.parent, run)
        keys = (["pfs_harrell_cindex", "os_harrell_cindex", "pfs_uno_cindex", "os_uno_cindex", "pfs_td_auc_mean",
                 "os_td_auc_mean", "pfs_integrated_brier_score", "os_integrated_brier_score", "os_logrank_p"]
                if name == "cmml" else ["roc_auc", "accuracy", "recall", "specificity", "f1"])
        for k in keys:
            m = metrics
            table.append({"model": name, "metric": k, "value": m.get(k, float("nan")),
                          "low": m.get(f"{k}_low", float("nan")), "high": m.get(f"{k}_high", float("nan")),
                          "oracle": oracle.get(k, float("nan")), "minutes": (time.perf_counter() - t0) / 60})
    total = (time.perf_counter() - start) / 60
    text = _table(table, total)
    (out / "demo.md").write_text(text)
    print("\n" + text, flush=True)
    return table


def _table(rows: list[dict[str, Any]], minutes: float) -> str:
    def f(x: float, p_value: bool = False) -> str:
        if x is None or not np.isfinite(x):
            return ""
        return f"{x:.2g}" if p_value else f"{x:.3f}"

    lines = ["| model | test metric | value | 95% CI | oracle |", "|---|---|---|---|---|"]
    for r in rows:
        ci = f"{f(r['low'])} – {f(r['high'])}" if np.isfinite(r["low"]) else ""
        lines.append(f"| {r['model']} | {r['metric']} | {f(r['value'], r['metric'].endswith('_p'))} | {ci} | {f(r['oracle'])} |")
    lines += ["", f"Total {minutes:.1f} min. Oracle: the generator's true log-hazard / logit on the same test "
                  "patients. Reports: cmml/report/summary.md, csfnet/report/summary.md.", ""]
    return "\n".join(lines)
