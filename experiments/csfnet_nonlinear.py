"""CSF-Net vs radiomics + logistic regression when malignancy shows in morphology and its change (not CI).

Two synthetic nodule cohorts from the same generator seed, preset ``fine`` (48 x 128 x 128 at
2 x 1 x 1 mm), T0 and T1 read back from NIfTI and cropped to 8 x 16 x 16 at 2 mm (a CPU budget;
``--crops "1 mm"``: the same field of view as 16 x 32 x 32 at 1 mm, about 8x the work):

- ``linear``: the imaging part of the malignancy logit is linear in the T0 diameter and the
  growth between the scans (generator 2);
- ``morphology``: it depends on what a radiologist compares between the scans: a growing solid
  component, new spiculation, pleural contact, growth that matters in part-solid nodules
  (``lungcore.data.synth.nodules.nodule_draw`` states every effect and its size).

On the same test nodules: a clinical-only logistic regression, a logistic regression on the
clinical variables plus 14 radiomics-style features at T0, at T1 and their T1 - T0 changes (42
features measured on each nodule's *true* mask, ``experiments/handcrafted.py``), the oracle (the
true logit) and CSF-Net (the published layer layout at the reduced widths of
``csfnet_synthetic.REDUCED``, or ``--width-scale`` times them; token fusion, and with ``--fusions tokens
published`` the published vector fusion too, paired per seed) with several training seeds. AUC with patient-grouped
bootstrap 95 % intervals, paired differences; writes experiments/results/csfnet_nonlinear.{md,csv}.

    .venv/bin/python experiments/csfnet_nonlinear.py --workdir /tmp/csfnet_nonlinear   # reuses the cohorts
    .venv/bin/python experiments/csfnet_nonlinear.py --fusions tokens published         # both fusions

``--cohorts interaction --networks-on interaction`` fits the third generator instead: the linear
cohort's images and records, the clinical record scaling the image effects (growth counts in
current smokers, size after a positive screen), which an additive model misses and a fusion of the
two modalities can learn (``experiments/results/csfnet_interaction.md``).
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
from cmml_common import command_line, start  # noqa: E402
from csfnet_synthetic import REDUCED, load_tensors, logistic_fit_predict, predict, train_variant  # noqa: E402
from handcrafted import (baseline_arguments, boosted_fit_predict, cohort_arguments, learned_table,  # noqa: E402
                         learned_terms, preset_text, saved_predictions, standardise, trains_on, truth_features,
                         with_changes, write_rows_csv)

from lungcore.data import CohortDataset, PreprocessSettings, read_manifest, split_by_patient, synth_cohort  # noqa: E402
from lungcore.metrics import bootstrap_ci, roc_auc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (spacing mm, crop voxels) of CSF-Net's inputs, one field of view (16 x 32 x 32 mm) at two resolutions:
# 2 mm is the CPU budget (the committed results), 1 mm about 8x the work
RESOLUTIONS = {"2 mm": ((2.0, 2.0, 2.0), (8, 16, 16)),
               "1 mm": ((1.0, 1.0, 1.0), (16, 32, 32))}
BOOSTED = "clinical + handcrafted boosted trees"
WIDTHS = ("stem_width", "clinical_embed_dim", "dim", "global_hidden", "head_hidden")  # and every stage width


def network_config(scale: int) -> dict:
    """``csfnet_synthetic.REDUCED`` with every width multiplied by ``scale`` (heads, depth and optimiser
    unchanged; ``scale`` 2 is about 4x the convolutions' work).

        >>> network_config(2)["stages"], network_config(2)["dim"], network_config(1) == REDUCED
        (((16,), (32,), (64,)), 64, True)
    """
    if scale < 1:
        raise ValueError(f"--width-scale must be >= 1, got {scale}")
    return {**REDUCED, **{k: REDUCED[k] * scale for k in WIDTHS},
            "stages": tuple(tuple(w * scale for w in stage) for stage in REDUCED["stages"])}


def clinical_design(data: dict[str, torch.Tensor], rows: np.ndarray, cardinalities) -> pd.DataFrame:
    """Clinical variables as a linear model sees them: numeric as is, categorical as dummies (code 0
    the reference), missing as 0 with a missing-indicator."""
    x = data["clinical"][torch.as_tensor(rows)].numpy()
    m = data["clinical_mask"][torch.as_tensor(rows)].numpy().astype(bool)
    cols: dict[str, np.ndarray] = {}
    for j, k in enumerate(cardinalities):
        if k == 0:
            cols[f"v{j}"] = np.where(m[:, j], x[:, j], 0.0)
        else:
            for code in range(1, k):
                cols[f"v{j}_{code}"] = ((x[:, j] == code) & m[:, j]).astype(float)
        cols[f"v{j}_missing"] = (~m[:, j]).astype(float)
    return pd.DataFrame(cols)


def logistic(x_fit: pd.DataFrame, y_fit: np.ndarray, x_test: pd.DataFrame) -> np.ndarray:
    tr, te = standardise(x_fit, x_test)
    keep = tr.std() > 0
    return logistic_fit_predict(tr.loc[:, keep].to_numpy(), y_fit, te.loc[:, keep].to_numpy())


def planted_terms(truth: pd.DataFrame, ids, effects: str) -> pd.DataFrame:
    """The generator's formula terms for these nodules (``truth.csv``; size and growth standardised over
    them; ``clinical`` = the clinical part of the true logit)."""
    t = truth.loc[list(ids)]

    def z(v):
        return (v - v.mean()) / v.std()

    terms = {"size": z(t["diameter_t0_mm"]), "growth": z(t["log_growth"])}
    if effects == "morphology":
        terms.update({"solid grew >= 0.15": t["solid_t1"] - t["solid_t0"] >= 0.15,
                      "spiculated at T1": t["margin_t1"] == "spiculated", "pleural": t["pleural"] == 1,
                      "part-solid x growth": t["solid_t0"].between(0.2, 0.8) * z(t["log_growth"])})
    if effects == "interaction":
        terms.update({"size x positive screen": z(t["diameter_t0_mm"]) * t["positive_screen"],
                      "growth x current smoker": z(t["log_growth"]) * t["current_smoker"]})
    terms["clinical"] = t["logit"] - t["logit_image"]
    return pd.DataFrame(terms).astype(float).reset_index(drop=True)


def run_cohort(effects: str, args, log) -> tuple[dict, dict]:
    work = Path(args.workdir) / effects
    info = synth_cohort("nodules", work, n=args.n, preset=args.preset, seed=args.seed, dicom_every=0, reuse=True,
                        effects=effects)
    log(f"{effects}: {info['n']} nodules of {info['patients']} patients, {info['positives']} malignant, "
        f"oracle AUC {info['oracle']['auc']:.4f}")
    manifest = read_manifest(info["manifest"])
    splits = {k: np.asarray(v) for k, v in split_by_patient(manifest, (0.55, 0.15, 0.30), seed=args.seed).items()}
    schema = manifest.subset(splits["train"].tolist()).fit_schema()
    spacing, crop = RESOLUTIONS[args.crops]
    data = load_tensors(CohortDataset(manifest, schema, PreprocessSettings(spacing=spacing, crop=crop),
                                      cache_dir=work / "cache"))
    cards = schema.cardinalities()
    fit, test = np.concatenate([splits["train"], splits["val"]]), splits["test"]
    y = data["label"].numpy().astype(int)
    truth_csv = work / "truth.csv"
    feats = {name: with_changes(truth_features(truth_csv, "nodule_id", [manifest.ids[i] for i in rows],
                                               prefixes=("feat_t0_", "feat_t1_"))) for name, rows in
             (("fit", fit), ("test", test))}
    probs = {"clinical logistic": logistic(clinical_design(data, fit, cards), y[fit],
                                           clinical_design(data, test, cards)),
             "clinical + handcrafted logistic": logistic(clinical_design(data, fit, cards).join(feats["fit"]), y[fit],
                                                         clinical_design(data, test, cards).join(feats["test"]))}
    n_train = len(splits["train"])  # fit = train, then val
    train_feats, val_feats = (feats["fit"].iloc[rows].reset_index(drop=True) for rows in
                              (slice(0, n_train), slice(n_train, None)))
    probs[BOOSTED], choice = boosted_fit_predict(
        (clinical_design(data, splits["train"], cards).join(train_feats), y[splits["train"]], None),
        (clinical_design(data, splits["val"], cards).join(val_feats), y[splits["val"]], None),
        clinical_design(data, test, cards).join(feats["test"]), max_trees=args.boosted_trees)
    log(f"{effects}: {BOOSTED}: {choice}")
    truth = pd.read_csv(truth_csv, dtype={"nodule_id": str}).set_index("nodule_id")
    probs["oracle"] = truth.loc[[manifest.ids[i] for i in test], "logit"].to_numpy()
    if args.networks_from and trains_on(args, effects):
        probs.update(saved_predictions(args.networks_from, "nodule_id", [manifest.ids[i] for i in test], "CSF-Net"))
    elif args.train_seeds and trains_on(args, effects):
        for fusion in args.fusions:
            for s in args.train_seeds:
                name = f"{FUSION_ROWS[fusion]}seed {s}"
                overrides = {**args.network, "fusion": fusion}
                net, epoch, val_auc, _ = train_variant(name, overrides, cards, data, splits, args.epochs, s)
                log(f"{effects}: {name}: best epoch {epoch}, validation AUC {val_auc:.4f}")
                probs[name] = predict(net, data, test)
    groups = np.asarray([manifest.patient_ids[i] for i in test])
    ids = [manifest.ids[i] for i in test]
    pd.DataFrame({"nodule_id": ids, "label": y[test], **probs}).to_csv(work / "test_probabilities.csv", index=False)
    terms = planted_terms(truth, ids, effects)
    learned = [{"effects": effects, "model": name, "terms": learned_terms(p, terms)} for name, p in probs.items()]
    return probs, {"y": y[test], "groups": groups, "info": info, "n_test": len(test), "learned": learned}


# row name prefix of each fusion's CSF-Net ("CSF-Net seed 0": the default token fusion, as committed)
FUSION_ROWS = {"tokens": "CSF-Net ", "published": "CSF-Net published fusion "}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/csfnet_nonlinear", help="where the two cohorts are written (reused)")
    ap.add_argument("--n", type=int, default=1600, help="nodules per cohort")
    ap.add_argument("--seed", type=int, default=0, help="generator and split seed")
    ap.add_argument("--preset", choices=("fine", "tiny"), default="fine",
                    help="synthetic volume preset (fine: 1 mm in-plane, the committed results; tiny: smoke runs)")
    ap.add_argument("--train-seeds", default="0,1,2", help="CSF-Net training seeds ('' = baselines only)")
    cohort_arguments(ap, "CSF-Net")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--crops", choices=tuple(RESOLUTIONS), default="2 mm",
                    help="CSF-Net's T0 / T1 crops: 8 x 16 x 16 at 2 mm (default, the committed results) or "
                         "16 x 32 x 32 at 1 mm (the same field of view, ~8x the work)")
    ap.add_argument("--width-scale", type=int, default=1,
                    help="multiply CSF-Net's reduced widths (csfnet_synthetic.REDUCED) by this (default 1; 2: about "
                         "4x the work)")
    ap.add_argument("--fusions", nargs="+", choices=FUSION_ROWS, default=["tokens"],
                    help="CSF-Net fusions to train at each seed (default: tokens, the model's default)")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    baseline_arguments(ap, "CSF-Net", "test_probabilities.csv")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    args.train_seeds = [int(s) for s in args.train_seeds.split(",") if s.strip()]
    try:
        args.network = network_config(args.width_scale)  # CSF-Net's configuration, checked once
    except ValueError as e:
        ap.error(str(e))
    out, log, t0 = start(args)

    rows, cohorts, learned = [], [], []
    for effects in args.cohorts:
        probs, meta = run_cohort(effects, args, log)
        y, groups = meta["y"], meta["groups"]
        learned += meta["learned"]
        hand = probs["clinical + handcrafted logistic"]

        def diff(a, b):
            return bootstrap_ci(lambda yy, p, q: roc_auc(yy, p) - roc_auc(yy, q), y, a, b, n_boot=args.n_boot,
                                seed=1, groups=groups)

        for name, p in probs.items():
            auc = bootstrap_ci(roc_auc, y, p, n_boot=args.n_boot, seed=1, groups=groups)
            mh, mb, om = diff(p, hand), diff(p, probs[BOOSTED]), diff(probs["oracle"], p)
            row = {"effects": effects, "model": name, "auc": auc[0], "low": auc[1], "high": auc[2],
                   "minus_handcrafted": mh[0], "mh_low": mh[1], "mh_high": mh[2],
                   "minus_boosted": mb[0], "mb_low": mb[1], "mb_high": mb[2],
                   "oracle_minus": om[0], "om_low": om[1], "om_high": om[2]}
            published = name.replace(FUSION_ROWS["tokens"], FUSION_ROWS["published"], 1)
            if name.startswith(FUSION_ROWS["tokens"] + "seed") and published in probs:  # paired, same seed
                row["tokens_minus_published"] = diff(p, probs[published])
            rows.append(row)
            log(f"{effects} {name}: AUC {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}]; - handcrafted {mh[0]:+.3f} "
                f"[{mh[1]:+.3f}, {mh[2]:+.3f}]; oracle - it {om[0]:+.3f} [{om[1]:+.3f}, {om[2]:+.3f}]")
        info = meta["info"]
        cohorts.append(f"| {effects} | {info['n']} | {info['patients']} | {info['positives']} | {meta['n_test']} | "
                       f"{int(y.sum())} |")
    write(out, args, rows, cohorts, learned, (time.time() - t0) / 60)
    log("done")


def write(out: Path, args, rows: list[dict], cohorts: list[str], learned: list[dict], minutes: float) -> None:
    spacing, crop = RESOLUTIONS[args.crops]
    pairs = [r for r in rows if "tokens_minus_published" in r]
    write_rows_csv(out / "csfnet_nonlinear.csv", [{k: v for k, v in r.items() if k != "tokens_minus_published"}
                                                  for r in rows])

    def ci(r, k, lo, hi, signed=False):
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(r[k])} [{f.format(r[lo])}, {f.format(r[hi])}]"

    md = ["# CSF-Net vs radiomics + logistic regression when malignancy shows in morphology and its change", "",
          f"`{command_line('csfnet_nonlinear.py')}` ({minutes:.0f} min on {args.threads} shared CPU thread(s), "
          f"torch {torch.__version__}). Preset `{args.preset}` ({preset_text(args.preset)}), T0 and T1 crops "
          f"{' x '.join(map(str, crop))} at {' x '.join(f'{v:g}' for v in spacing)} mm. CSF-Net: the "
          f"published layer layout at reduced widths "
          f"({', '.join(f'{k}={v}' for k, v in args.network.items())}), "
          f"{args.epochs} epochs, epoch selected on validation AUC. Split 55/15/30 % by patient; the logistic "
          "models are fitted on train + validation; the boosted trees choose their setting and number of trees "
          f"on validation and are refitted on train + validation. Patient-grouped bootstrap 95 % intervals "
          f"({args.n_boot} resamples, paired for differences)."
          + (f" CSF-Net's test probabilities are those of an earlier run (`--networks-from "
             f"{args.networks_from.name}`), not trained here." if args.networks_from else ""), "",
          "| cohort | nodules | patients | malignant | test nodules | test malignant |", "|---|---|---|---|---|---|",
          *cohorts, "",
          "| cohort | model | AUC | model - handcrafted | oracle - model |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['effects']} | {r['model']} | {ci(r, 'auc', 'low', 'high')} | "
                  f"{ci(r, 'minus_handcrafted', 'mh_low', 'mh_high', True)} | "
                  f"{ci(r, 'oracle_minus', 'om_low', 'om_high', True)} |")
    md += ["", "## What each model's output responds to", "",
           "Least-squares coefficients of each model's standardised output (probability; the oracle's logit) "
           "on the generator's terms (`handcrafted.learned_terms`; size and growth standardised, the others 0/1, "
           "`clinical` the clinical part of the true logit). The oracle's row is the formula up to scale; a term "
           "a model misses is near 0 in its row.", ""]
    md += learned_table(learned, "terms")
    md += ["## Reading", ""]
    for effects in dict.fromkeys(r["effects"] for r in rows):
        g = next(r for r in rows if r["effects"] == effects and r["model"] == "clinical + handcrafted logistic")
        md.append(f"- **{effects}**: oracle - handcrafted = {g['oracle_minus']:+.3f} "
                  f"[{g['om_low']:+.3f}, {g['om_high']:+.3f}].")
    for effects in dict.fromkeys(r["effects"] for r in rows):
        for fusion, prefix in FUSION_ROWS.items():
            nets = [r for r in rows if r["model"].startswith(prefix + "seed") and r["effects"] == effects]
            if nets:
                d, g = [r["minus_handcrafted"] for r in nets], [r["oracle_minus"] for r in nets]
                md.append(f"- **CSF-Net ({fusion} fusion) on {effects}** over {len(nets)} training seeds: model - "
                          f"handcrafted {np.mean(d):+.3f} (seeds {', '.join(f'{x:+.3f}' for x in d)}), model - "
                          f"boosted trees {np.mean([r['minus_boosted'] for r in nets]):+.3f} (seeds "
                          + ", ".join(ci(r, "minus_boosted", "mb_low", "mb_high", True) for r in nets)
                          + f"), oracle - model {np.mean(g):+.3f}.")
        ts = [r["tokens_minus_published"][0] for r in pairs if r["effects"] == effects]
        if ts:
            md.append(f"- **token - published fusion on {effects}**, mean over {len(ts)} paired seeds: "
                      f"{np.mean(ts):+.3f}.")
    for r in pairs:
        t = r["tokens_minus_published"]
        md.append(f"- {r['effects']}, {r['model']}: token fusion - published fusion (same seed, paired) "
                  f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}].")
    (out / "csfnet_nonlinear.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
