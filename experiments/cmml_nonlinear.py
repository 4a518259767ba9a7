"""CMML vs radiomics + Cox on a cohort whose image effects a linear model cannot see (not CI).

Two synthetic survival cohorts from the same generator seed, preset ``fine`` (48 x 128 x 128 at
2 x 1 x 1 mm, the ``tiny`` field of view at 1 mm in-plane so that margins are visible), read back
from NIfTI and cropped to 16 x 32 x 32 at 2 x 1 x 1 mm around the tumour:

- ``linear``: the imaging part of the log-hazard is 1.0 z_size + 0.7 z_texture (generator 2);
- ``morphology``: it is what a radiologist reads (margin class, a solid core above half the
  volume, a cavity, pleural contact, a size x texture interaction; ``lungcore.data.synth.survival``).

On the same test patients: a clinical-only Cox model, a Cox model on the clinical variables plus
14 radiomics-style features measured on each tumour's *true* mask (``experiments/handcrafted.py``),
the oracle (the true log-hazard) and CMML (masked pretraining + Cox fine-tuning, the model of
``cmml_common.model_config``) with several training seeds. Reports C-index with bootstrap 95 %
intervals and paired differences; writes experiments/results/cmml_nonlinear.{md,csv}.

    .venv/bin/python experiments/cmml_nonlinear.py --workdir /tmp/cmml_nonlinear   # reuses the cohorts

``--cohorts interaction --networks-on interaction`` fits the third generator instead: the linear
cohort's images and records, with tumour size counting in PD-L1-low patients only
(``experiments/results/cmml_interaction.md``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmml_common import (ENDPOINTS, _features, build_cohort, command_line, finetune, model_config,  # noqa: E402
                         paired_difference, predict, pretrain, start)
from handcrafted import (BOOSTED_MAX_TREES, baseline_arguments, boosted_fit_predict, cohort_arguments,  # noqa: E402
                         cox_fit_predict, learned_table, learned_terms, preset_text, saved_predictions, trains_on,
                         truth_features, write_rows_csv)

from lungcore.metrics import bootstrap_ci, concordance_index  # noqa: E402
from lungcore.models import create  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPACING, CROP = (2.0, 1.0, 1.0), (16, 32, 32)
BOOSTED = "clinical + handcrafted boosted trees"


def _merge(*splits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([s[k] for s in splits]) for k in splits[0]}


def baselines(cohort, workdir: Path, log=print, max_trees: int = BOOSTED_MAX_TREES) -> dict[str, dict[str, np.ndarray]]:
    """Test-split risks per model and endpoint: clinical-only Cox, clinical + handcrafted Cox, the same
    columns in boosted trees (``handcrafted.boosted_fit_predict``), oracle. The linear models are fitted
    on train + validation (the networks select their epoch on validation)."""
    fit = _merge(cohort.splits["train"], cohort.splits["val"])
    test = cohort.splits["test"]
    truth = workdir / "truth.csv"
    feats_fit = truth_features(truth, "patient_id", np.concatenate([cohort.ids["train"], cohort.ids["val"]]))
    feats_test = truth_features(truth, "patient_id", cohort.ids["test"])
    clin_fit, clin_test = _features(fit, False), _features(test, False)
    designs = {"clinical Cox": (clin_fit, clin_test),
               "clinical + handcrafted Cox": (clin_fit.join(feats_fit), clin_test.join(feats_test))}
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, (x_fit, x_test) in designs.items():
        out[name] = {}
        for e in ENDPOINTS:
            m = fit[f"{e}_mask"].numpy().astype(bool)
            out[name][e] = cox_fit_predict(x_fit[m].reset_index(drop=True), fit[f"{e}_time"].numpy()[m],
                                           fit[f"{e}_event"].numpy()[m], x_test)
    train, val = cohort.splits["train"], cohort.splits["val"]
    n_train = len(cohort.ids["train"])
    x_all = clin_fit.join(feats_fit)
    out[BOOSTED] = {}
    for e in ENDPOINTS:
        parts = []
        for split, rows in ((train, slice(0, n_train)), (val, slice(n_train, None))):
            m = split[f"{e}_mask"].numpy().astype(bool)
            parts.append((x_all.iloc[rows][m].reset_index(drop=True), split[f"{e}_time"].numpy()[m],
                          split[f"{e}_event"].numpy()[m]))
        out[BOOSTED][e], choice = boosted_fit_predict(parts[0], parts[1], clin_test.join(feats_test),
                                                      max_trees=max_trees)
        log(f"{BOOSTED} {e}: {choice}")
    out["oracle"] = {e: cohort.eta["test"] for e in ENDPOINTS}
    return out


def planted_terms(workdir: Path, ids, effects: str) -> pd.DataFrame:
    """The generator's formula terms for these patients, from ``truth.csv`` (sizes and textures
    standardised over the test patients; ``clinical`` = the clinical part of the log-hazard)."""
    t = pd.read_csv(workdir / "truth.csv", dtype={"patient_id": str}).set_index("patient_id").loc[list(ids)]

    def z(v):
        return (v - v.mean()) / v.std()

    size, texture = z(np.log(t["diameter_mm"])), z(t["texture"])
    terms = {"size": size}
    if effects == "linear":
        terms["texture"] = texture
    elif effects == "interaction":
        terms.update({"texture": texture, "size x PD-L1 low": size * t["pdl1_low"]})
    else:
        terms.update({"lobulated": t["margin"] == "lobulated", "spiculated": t["margin"] == "spiculated",
                      "solid >= 0.5": t["solid_fraction"] >= 0.5, "pleural": t["pleural"] == 1,
                      "cavity": t["cavity"] > 0, "size x texture": size * texture})
    terms["clinical"] = t["eta"] - t["eta_image"]
    return pd.DataFrame(terms).astype(float).reset_index(drop=True)


def cindex_ci(risk: np.ndarray, data, e: str, n_boot: int) -> tuple[float, float, float]:
    m = data[f"{e}_mask"].numpy().astype(bool)
    return bootstrap_ci(lambda r, t, ev: float(concordance_index(r, t, ev)), risk[m], data[f"{e}_time"].numpy()[m],
                        data[f"{e}_event"].numpy()[m], n_boot=n_boot, seed=1)


def train_network(cohort, args, seed: int, log) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    model = create("cmml", **model_config(cohort, args.width, args.depth, patch_size=tuple(args.patch)))
    train, val = cohort.splits["train"], cohort.splits["val"]
    pretrain(model, train, epochs=args.pretrain_epochs, seed=seed, log=log)
    ft = finetune(model, train, val, epochs=args.finetune_epochs, batch_size=args.finetune_batch, lr=args.finetune_lr,
                  seed=seed, log=log)
    log(f"seed {seed}: best validation C-index {ft['best_val_cindex']:.4f}")
    return predict(model, cohort.splits["test"])


def fmt_ci(v: tuple[float, float, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v[0])} [{f.format(v[1])}, {f.format(v[2])}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/cmml_nonlinear", help="where the two cohorts are written (reused)")
    ap.add_argument("--n", type=int, default=1200, help="patients per cohort")
    ap.add_argument("--seed", type=int, default=0, help="generator and split seed")
    ap.add_argument("--preset", choices=("fine", "tiny"), default="fine",
                    help="synthetic volume preset (fine: 1 mm in-plane, the committed results; tiny: smoke runs)")
    ap.add_argument("--train-seeds", default="0,1,2", help="CMML training seeds ('' = baselines only)")
    cohort_arguments(ap, "CMML")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=20)
    ap.add_argument("--finetune-batch", type=int, default=64)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--patch", type=int, nargs=3, default=(4, 4, 4), help="CT patch size (D H W) in crop voxels")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    baseline_arguments(ap, "CMML", "test_risks.csv")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    out, log, t0 = start(args)

    seeds = [int(s) for s in args.train_seeds.split(",") if s.strip()]
    rows, md_cohorts, learned = [], [], []
    for effects in args.cohorts:
        work = Path(args.workdir) / effects
        cohort = build_cohort(work, args.n, args.seed, spacing=SPACING, crop=CROP, log=log, preset=args.preset,
                              effects=effects)
        test = cohort.splits["test"]
        risks = baselines(cohort, work, log, args.boosted_trees)
        if args.networks_from and trains_on(args, effects):
            for col, r in saved_predictions(args.networks_from, "patient_id", cohort.ids["test"], "CMML").items():
                name, e = col.rsplit(" ", 1)
                risks.setdefault(name, {})[e] = r
        elif seeds and trains_on(args, effects):
            for s in seeds:
                log(f"{effects}: CMML, training seed {s}")
                risks[f"CMML seed {s}"] = train_network(cohort, args, s, log)
        hand = risks["clinical + handcrafted Cox"]
        terms = planted_terms(work, cohort.ids["test"], effects)
        for name, r in risks.items():
            learned.append({"effects": effects, "model": name, **{
                e: learned_terms(r[e], terms) for e in ENDPOINTS}})
        pd.DataFrame({"patient_id": cohort.ids["test"], **{f"{name} {e}": r[e] for name, r in risks.items()
                                                           for e in ENDPOINTS}}).to_csv(work / "test_risks.csv",
                                                                                          index=False)
        for name, r in risks.items():
            for e in ENDPOINTS:
                ci = cindex_ci(r[e], test, e, args.n_boot)
                vs_hand = paired_difference({e: r[e] for e in ENDPOINTS}, hand, test, n_boot=args.n_boot)[e]
                vs_boosted = paired_difference({e: r[e] for e in ENDPOINTS}, risks[BOOSTED], test,
                                               n_boot=args.n_boot)[e]
                to_oracle = paired_difference(risks["oracle"], {e: r[e] for e in ENDPOINTS}, test,
                                              n_boot=args.n_boot)[e]
                rows.append({"effects": effects, "model": name, "endpoint": e, "cindex": ci[0], "low": ci[1],
                             "high": ci[2], "minus_handcrafted": vs_hand[0], "mh_low": vs_hand[1],
                             "mh_high": vs_hand[2], "minus_boosted": vs_boosted[0], "mb_low": vs_boosted[1],
                             "mb_high": vs_boosted[2], "oracle_minus": to_oracle[0], "om_low": to_oracle[1],
                             "om_high": to_oracle[2]})
                log(f"{effects} {name} {e}: {fmt_ci(ci)}; - handcrafted {fmt_ci(vs_hand, True)}; "
                    f"oracle - it {fmt_ci(to_oracle, True)}")
        n_te = len(test["ct"])
        events = {e: int(test[f"{e}_event"][test[f"{e}_mask"].bool()].sum()) for e in ENDPOINTS}
        md_cohorts.append(f"| {effects} | {args.n} | {n_te} | {events['pfs']} | {events['os']} |")
    write(out, args, rows, md_cohorts, learned, (time.time() - t0) / 60)
    log("done")


def write(out: Path, args, rows: list[dict], md_cohorts: list[str], learned: list[dict], minutes: float) -> None:
    write_rows_csv(out / "cmml_nonlinear.csv", rows)

    def row(effects, model, e):
        return next(r for r in rows if r["effects"] == effects and r["model"] == model and r["endpoint"] == e)

    md = ["# CMML vs radiomics + Cox when the image effects are non-linear", "",
          f"`{command_line('cmml_nonlinear.py')}` ({minutes:.0f} min on {args.threads} shared CPU thread(s), "
          f"torch {torch.__version__}). Preset `{args.preset}` ({preset_text(args.preset)}), crops "
          f"{CROP[0]} x {CROP[1]} x {CROP[2]} at {SPACING[0]:g} x {SPACING[1]:g} x {SPACING[2]:g} mm; CMML width "
          f"{args.width}, depth {args.depth}, patches {tuple(args.patch)}, pretraining {args.pretrain_epochs} and "
          f"fine-tuning {args.finetune_epochs} epochs. Split 50/10/40 % by patient; the linear models are fitted "
          "on train + validation; the boosted trees choose their setting and number of trees on validation and "
          "are refitted on train + validation. Bootstrap 95 % intervals "
          f"({args.n_boot} resamples, paired for differences)."
          + (f" CMML's test risks are those of an earlier run (`--networks-from {args.networks_from.name}`), "
             "not trained here." if args.networks_from else ""), "",
          "| cohort | patients | test patients | test PFS events | test OS events |", "|---|---|---|---|---|",
          *md_cohorts, "",
          "| cohort | model | PFS C-index | OS C-index | PFS: model - handcrafted | OS: model - handcrafted "
          "| PFS: oracle - model | OS: oracle - model |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["endpoint"] != "pfs":
            continue
        p, o = r, row(r["effects"], r["model"], "os")
        cells = [fmt_ci((x["cindex"], x["low"], x["high"])) for x in (p, o)]
        cells += [fmt_ci((x["minus_handcrafted"], x["mh_low"], x["mh_high"]), True) for x in (p, o)]
        cells += [fmt_ci((x["oracle_minus"], x["om_low"], x["om_high"]), True) for x in (p, o)]
        md.append(f"| {r['effects']} | {r['model']} | " + " | ".join(cells) + " |")
    md += ["", "## What each model's risk responds to", "",
           "Least-squares coefficients of each model's standardised test risk on the generator's terms "
           "(`handcrafted.learned_terms`; OS; size and texture standardised, the others 0/1, `clinical` the "
           "clinical part of the true log-hazard). The oracle's row is the formula up to scale; a term a model "
           "misses is near 0 in its row.", ""]
    md += learned_table(learned, "os")
    md += ["## Reading", ""]
    for effects in dict.fromkeys(r["effects"] for r in rows):
        gaps = [row(effects, "clinical + handcrafted Cox", e)["oracle_minus"] for e in ENDPOINTS]
        md.append(f"- **{effects}**: oracle - handcrafted = PFS {gaps[0]:+.3f}, OS {gaps[1]:+.3f} "
                  f"({'>=' if min(gaps) >= 0.06 else '<'} 0.06 on {'both endpoints' if min(gaps) >= 0.06 else 'some endpoint'}).")
    for effects in dict.fromkeys(r["effects"] for r in rows):
        nets = [r for r in rows if r["model"].startswith("CMML") and r["effects"] == effects]
        for e in ENDPOINTS if nets else ():
            d = [r["minus_handcrafted"] for r in nets if r["endpoint"] == e]
            g = [r["oracle_minus"] for r in nets if r["endpoint"] == e]
            b = [r for r in nets if r["endpoint"] == e]
            md.append(f"- **CMML on {effects}, {e.upper()}** over {len(d)} training seeds: model - handcrafted "
                      f"{np.mean(d):+.3f} (seeds {', '.join(f'{x:+.3f}' for x in d)}), model - boosted trees "
                      f"{np.mean([r['minus_boosted'] for r in b]):+.3f} (seeds "
                      + ", ".join(fmt_ci((r["minus_boosted"], r["mb_low"], r["mb_high"]), True) for r in b)
                      + f"), oracle - model {np.mean(g):+.3f}.")
    (out / "cmml_nonlinear.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
