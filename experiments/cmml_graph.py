"""CMML's clinical graph: T2G-Former's gated graph ("t2g") vs the dense soft-bias graph ("dense"), clinical only (not CI).

Both options train the same CMML pipeline with no CT at all (``ct_mask`` False): clinical masked
pretraining, then Cox fine-tuning with the best epoch chosen on a validation split.

* Synthetic cohort (experiments/cmml_common.py ``build_cohort``): one train/val/test split, the
  model trained from ``--seeds`` seeds per option; test C-index per endpoint (PFS, OS) with
  bootstrap 95 % intervals, the oracle (the generator's true log-hazard) and the paired
  bootstrap interval of t2g - dense on the same test patients.
* Real clinical tables shipped with lifelines: NCCTG lung cancer (``load_lung``, 228 patients,
  OS; age, sex, ECOG, physician and patient Karnofsky, meal calories, weight loss; 60 patients
  miss at least one value, kept as missing) and GBSG2 breast cancer (``load_gbsg2``, 686 patients,
  recurrence-free survival; 8 variables). ``--repeats`` x ``--folds`` cross-validation (a fifth of
  each training part is the validation split), the same folds for both options; per fold the test
  C-index of each option and of a linear Cox model (lifelines ``CoxPHFitter``, mean-imputed),
  summarised as the mean over folds with a percentile bootstrap interval over the folds, and the
  paired per-fold difference t2g - dense.

Writes experiments/results/cmml_graph.{md,csv}. Single-threaded, small models and epochs:

    .venv/bin/python experiments/cmml_graph.py --workdir /tmp/cmml_graph_synth
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmml_common import (ENDPOINTS, Cohort, add_arguments, build_cohort, cindex, command_line,  # noqa: E402
                         finetune, fractions, model_config, paired_difference, predict, pretrain, restrict,
                         start, test_cindex)

from lungcore.models import create  # noqa: E402
from lungcore.models.clinical_graph import GRAPHS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = ("lung", "gbsg2")


# ------------------------------------------------------------------------------------ real tables
def load_table(name: str):
    """(DataFrame of the variables, cardinalities, time, event) of a lifelines clinical table.

    Categorical variables are integer codes 0..k-1; numeric ones raw (standardised per fold);
    missing values stay NaN.
    """
    import pandas as pd
    from lifelines import datasets

    if name == "lung":
        df = datasets.load_lung()
        x = pd.DataFrame({"age": df["age"], "sex": df["sex"] - 1, "ph_ecog": df["ph.ecog"],
                          "ph_karno": df["ph.karno"], "pat_karno": df["pat.karno"], "meal_cal": df["meal.cal"],
                          "wt_loss": df["wt.loss"]})
        cards = (0, 2, 4, 0, 0, 0, 0)
        return x, cards, df["time"].to_numpy(float), (df["status"] == 1).to_numpy(float)  # lifelines codes death as 1
    if name == "gbsg2":
        df = datasets.load_gbsg2()
        grade = {"I": 0, "II": 1, "III": 2}
        x = pd.DataFrame({"horTh": (df["horTh"] == "yes").astype(float), "age": df["age"],
                          "menostat": (df["menostat"] == "Post").astype(float), "tsize": df["tsize"],
                          "tgrade": df["tgrade"].map(grade).astype(float), "pnodes": np.log1p(df["pnodes"]),
                          "progrec": np.log1p(df["progrec"]), "estrec": np.log1p(df["estrec"])})
        cards = (2, 0, 2, 0, 3, 0, 0, 0)
        return x, cards, df["time"].to_numpy(float), df["cens"].to_numpy(float)
    raise ValueError(f"table must be one of {TABLES}, got {name!r}")


def table_split(x, cards, time_, event, idx, stats) -> dict[str, torch.Tensor]:
    """The CMML batch dict of rows ``idx``: numeric columns standardised with ``stats`` (train
    mean, std), NaN -> absent, no CT (a 2 x 4 x 4 placeholder, ``ct_mask`` False), OS endpoint."""
    vals = x.to_numpy(float)[idx].copy()
    present = ~np.isnan(vals)
    for j, k in enumerate(cards):
        if k == 0:
            vals[:, j] = (vals[:, j] - stats[j][0]) / stats[j][1]
    vals = np.where(present, vals, 0.0)
    n = len(idx)
    return {"ct": torch.zeros(n, 1, 2, 4, 4), "ct_mask": torch.zeros(n, dtype=torch.bool),
            "clinical": torch.tensor(vals, dtype=torch.float32), "clinical_mask": torch.tensor(present),
            "os_time": torch.tensor(time_[idx], dtype=torch.float32),
            "os_event": torch.tensor(event[idx], dtype=torch.float32), "os_mask": torch.ones(n, dtype=torch.bool)}


def linear_cox(x, cards, time_, event, train_idx, test_idx) -> float:
    """Test C-index of a ridge-penalised linear Cox model (dummies, train-mean imputation)."""
    import pandas as pd
    from lifelines import CoxPHFitter

    cols = {}
    for j, (name, k) in enumerate(zip(x.columns, cards)):
        col = x[name]
        if k == 0:
            cols[name] = col.fillna(col.iloc[train_idx].mean())
        else:
            for c in range(1, k):
                cols[f"{name}_{c}"] = (col == c).astype(float)
    design = pd.DataFrame(cols)
    sd = design.iloc[train_idx].std()
    design = design.loc[:, sd > 0]  # a category absent from the training part (ECOG 3: one patient)
    design = (design - design.iloc[train_idx].mean()) / sd[sd > 0]
    df = design.iloc[train_idx].assign(T=time_[train_idx], E=event[train_idx])
    cph = CoxPHFitter(penalizer=0.05).fit(df, "T", "E")
    risk = cph.predict_log_partial_hazard(design.iloc[test_idx]).to_numpy()
    return cindex(risk, time_[test_idx], event[test_idx])


def fold_bootstrap(values: np.ndarray, n_boot: int, seed: int = 1) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap 95 % interval of the mean over folds."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def run_table(name: str, args, log) -> tuple[list[dict], dict]:
    x, cards, time_, event = load_table(name)
    n = len(x)
    per_fold: list[dict] = []
    fake = Cohort({}, {}, list(cards), {"crop": (2, 4, 4)})
    for rep in range(args.repeats):
        rng = np.random.default_rng(1000 + rep)
        folds = np.array_split(rng.permutation(n), args.folds)
        for f in range(args.folds):
            test_idx = np.sort(folds[f])
            rest = rng.permutation(np.concatenate([folds[g] for g in range(args.folds) if g != f]))
            n_val = max(1, len(rest) // 5)
            val_idx, train_idx = np.sort(rest[:n_val]), np.sort(rest[n_val:])
            vals = x.to_numpy(float)[train_idx]
            stats = [(np.nanmean(vals[:, j]), np.nanstd(vals[:, j]) or 1.0) for j in range(len(cards))]
            train, val, test = (table_split(x, cards, time_, event, i, stats) for i in (train_idx, val_idx, test_idx))
            row = {"table": name, "repeat": rep, "fold": f, "n_test": len(test_idx),
                   "events_test": int(event[test_idx].sum()),
                   "linear_cox": linear_cox(x, cards, time_, event, np.concatenate([train_idx, val_idx]), test_idx)}
            seed = 100 * rep + f
            for graph in GRAPHS:
                torch.manual_seed(seed)
                model = create("cmml", **model_config(fake, args.width, args.depth, patch_size=(2, 4, 4),
                                                      endpoints=("os",), clinical_graph=graph))
                if args.pretrain_epochs:
                    pretrain(model, train, epochs=args.pretrain_epochs, batch_size=args.finetune_batch, seed=seed,
                             log=lambda m: None)
                finetune(model, train, val, epochs=args.finetune_epochs, batch_size=args.finetune_batch,
                         lr=args.finetune_lr, seed=seed, log=lambda m: None)
                r = predict(model, test)["os"]
                row[graph] = cindex(r, test["os_time"], test["os_event"])
            row["diff"] = row["t2g"] - row["dense"]
            per_fold.append(row)
            log(f"{name} repeat {rep} fold {f}: t2g {row['t2g']:.3f}, dense {row['dense']:.3f}, "
                f"linear Cox {row['linear_cox']:.3f}")
    summary = {"table": name, "n": n, "events": int(event.sum()), "folds": len(per_fold)}
    for key in (*GRAPHS, "linear_cox", "diff"):
        summary[key] = fold_bootstrap(np.array([r[key] for r in per_fold]), args.n_boot)
    summary["t2g_wins"] = sum(r["diff"] > 0 for r in per_fold)
    return per_fold, summary


# ------------------------------------------------------------------------------------ synthetic
def run_synthetic(args, log) -> tuple[list[dict], dict]:
    cohort = build_cohort(Path(args.workdir), args.n, args.seed, fractions(args), log=log)
    train, val, test = (restrict(cohort.splits[k], "clinical") for k in ("train", "val", "test"))
    eta = cohort.eta["test"]
    rows, risks = [], {g: [] for g in GRAPHS}
    for seed in range(args.seeds):
        per = {}
        for graph in GRAPHS:
            t = time.time()
            torch.manual_seed(seed)
            model = create("cmml", **model_config(cohort, args.width, args.depth, clinical_graph=graph))
            if args.pretrain_epochs:
                pretrain(model, train, epochs=args.pretrain_epochs, seed=seed, log=lambda m: None)
            fit = finetune(model, train, val, epochs=args.finetune_epochs, batch_size=args.finetune_batch,
                           lr=args.finetune_lr, seed=seed, log=lambda m: None)
            per[graph] = predict(model, test)
            risks[graph].append(per[graph])
            res = test_cindex(model, test, eta, n_boot=args.n_boot)
            for e in ENDPOINTS:
                rows.append({"table": "synthetic", "seed": seed, "graph": graph, "endpoint": e,
                             "best_val_cindex": fit["best_val_cindex"], **res[e]})
            log(f"synthetic seed {seed} {graph}: test C-index PFS {res['pfs']['cindex']:.3f}, "
                f"OS {res['os']['cindex']:.3f} ({time.time() - t:.0f} s)")
        diff = paired_difference(per["t2g"], per["dense"], test, n_boot=args.n_boot)
        for e in ENDPOINTS:
            rows.append({"table": "synthetic", "seed": seed, "graph": "t2g-dense", "endpoint": e,
                         "cindex": diff[e][0], "cindex_low": diff[e][1], "cindex_high": diff[e][2]})
    # the seeds' mean risk (an ensemble per option): one paired comparison over the seeds
    mean_risk = {g: {e: np.mean([r[e] for r in risks[g]], axis=0) for e in ENDPOINTS} for g in GRAPHS}
    ens = paired_difference(mean_risk["t2g"], mean_risk["dense"], test, n_boot=args.n_boot)
    summary = {"n_test": len(eta), "ensemble_diff": ens,
               "ensemble": {g: {e: cindex(mean_risk[g][e], test[f"{e}_time"], test[f"{e}_event"], test[f"{e}_mask"])
                                for e in ENDPOINTS} for g in GRAPHS}}
    return rows, summary


def fmt(t) -> str:
    return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, pretrain_epochs=10, finetune_epochs=25, out=RESULTS)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per option on the synthetic cohort")
    ap.add_argument("--tables", default=",".join(TABLES), help=f"lifelines tables to run, from {TABLES} ('' = none)")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds on each real table")
    ap.add_argument("--repeats", type=int, default=3, help="cross-validation repeats (new fold assignment each)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of every interval")
    ap.add_argument("--skip-synthetic", action="store_true", help="run the real tables only")
    args = ap.parse_args()
    out, log, t0 = start(args)

    synth_rows, synth = ([], None) if args.skip_synthetic else run_synthetic(args, log)
    table_rows, table_sums = [], []
    for name in [t for t in args.tables.split(",") if t.strip()]:
        rows, s = run_table(name.strip(), args, log)
        table_rows += rows
        table_sums.append(s)

    with open(out / "cmml_graph.csv", "w", newline="") as fh:
        keys = ["table", "seed", "repeat", "fold", "graph", "endpoint", "n", "events", "n_test", "events_test",
                "cindex", "cindex_low", "cindex_high", "oracle", "oracle_low", "oracle_high", "best_val_cindex",
                "t2g", "dense", "diff", "linear_cox"]
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in synth_rows + table_rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})

    lines = ["# CMML clinical graph: T2G-Former gated graph (`t2g`) vs dense soft bias (`dense`), clinical only", "",
             f"Command: `{command_line('cmml_graph.py')}` ({time.time() - t0:.0f} s, {args.threads} thread(s)).",
             f"Width {args.width}, 2 graph layers, 4 heads; {args.pretrain_epochs} clinical masked-pretraining "
             f"epochs, {args.finetune_epochs} Cox fine-tuning epochs (best validation epoch kept), no CT.", ""]
    if synth is not None:
        lines += [f"## Synthetic cohort (n = {args.n}, test {synth['n_test']} patients, {args.seeds} seeds)", "",
                  "| seed | graph | PFS C-index [95 % CI] | OS C-index [95 % CI] |", "|---|---|---|---|"]
        by = {(r["seed"], r["graph"], r["endpoint"]): r for r in synth_rows}
        for seed in range(args.seeds):
            for g in (*GRAPHS, "t2g-dense"):
                cells = [fmt((by[seed, g, e]["cindex"], by[seed, g, e]["cindex_low"], by[seed, g, e]["cindex_high"]))
                         for e in ENDPOINTS]
                lines.append(f"| {seed} | {g} | {cells[0]} | {cells[1]} |")
        o = by[0, "t2g", "pfs"], by[0, "t2g", "os"]
        lines += ["", f"Oracle (true log-hazard): PFS {o[0]['oracle']:.3f}, OS {o[1]['oracle']:.3f}. "
                  "Mean risk over the seeds (per option): "
                  + ", ".join(f"{g} PFS {synth['ensemble'][g]['pfs']:.3f} / OS {synth['ensemble'][g]['os']:.3f}"
                              for g in GRAPHS)
                  + "; paired t2g - dense: " + ", ".join(f"{e.upper()} {fmt(synth['ensemble_diff'][e])}"
                                                         for e in ENDPOINTS) + ".", ""]
    if table_sums:
        lines += [f"## Real clinical tables (lifelines), {args.repeats} x {args.folds}-fold cross-validation", "",
                  "Mean test C-index over the folds, percentile bootstrap 95 % interval over the folds "
                  "(folds of different repeats share patients, so the intervals are somewhat narrow).", "",
                  "| table | patients (events) | t2g | dense | t2g - dense (paired) | t2g better in | linear Cox |",
                  "|---|---|---|---|---|---|---|"]
        for s in table_sums:
            lines.append(f"| {s['table']} | {s['n']} ({s['events']}) | {fmt(s['t2g'])} | {fmt(s['dense'])} | "
                         f"{fmt(s['diff'])} | {s['t2g_wins']}/{s['folds']} folds | {fmt(s['linear_cox'])} |")
        lines.append("")
    (out / "cmml_graph.md").write_text("\n".join(lines))
    log(f"wrote {out / 'cmml_graph.md'} and cmml_graph.csv")


if __name__ == "__main__":
    main()
