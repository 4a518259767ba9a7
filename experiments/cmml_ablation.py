"""CMML ablations on the synthetic cohort of experiments/cmml_synthetic.py (not CI).

Rows: pretraining on/off x modalities (CT only / clinical only / both) at the default CT mask
ratio, the CT mask ratio 0.5 / 0.75 / 0.9 with both modalities, and pretraining on/off when only a
fraction of the training patients have endpoints (``--label-fractions``; pretraining still uses
every training patient's images and record: the label-scarce setting masked pretraining is for).
Pretraining always sees both modalities; "CT only" / "clinical only" fine-tune and test with the
other modality absent (``clinical_mask`` all False / ``ct_mask`` False). Reports test C-index (PFS,
OS) with bootstrap 95 % intervals, the oracle, and paired bootstrap intervals of the differences
that answer the ablation's questions. Also: fine-tuning fusion from the pretrained completion layers
vs a fresh fusion (``fusion_init``) at full and reduced labels, a model fine-tuned with zero-filling
of an absent modality (``missing_modality="zero"``), and a test-time withholding table (the CT / the
clinical record withheld from every test patient, completed vs zero-filled). Writes
experiments/results/cmml_ablation.{md,csv} and cmml_ablation_withholding.csv.

    .venv/bin/python experiments/cmml_ablation.py --workdir /tmp/cmml_synth   # reuses the cohort
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmml_common import (ENDPOINTS, add_arguments, augmentation, build_cohort, command_line,  # noqa: E402
                         finetune, fractions, model_config, paired_difference, predict, pretrain, restrict,
                         start, test_cindex)

from lungcore.models import create  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, pretrain_epochs=20, finetune_epochs=25, out=RESULTS)
    ap.add_argument("--ratios", default="0.5,0.75,0.9")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--label-fractions", default="0.15",
                    help="also fine-tune on only these fractions of the training patients' endpoints, with and "
                         "without pretraining on all of them (where masked pretraining should pay off)")
    ap.add_argument("--subset", choices=("all", "fusion"), default="all",
                    help="all: every row; fusion: only the rows of the fusion / missing-modality questions (pretrained "
                         "vs fresh fusion at full and reduced labels, fine-tuned with zero-filling, test-time "
                         "withholding) at the default CT mask ratio")
    args = ap.parse_args()
    out, log, t0 = start(args)

    cohort = build_cohort(Path(args.workdir), args.n, args.seed, fractions(args), log=log)
    train, val, test = (cohort.splits[k] for k in ("train", "val", "test"))
    ratios = [float(r) for r in args.ratios.split(",")]
    default_ratio = 0.75 if 0.75 in ratios else ratios[0]
    label_fracs = [float(f) for f in args.label_fractions.split(",") if f.strip()]
    # (pretraining, modalities, CT mask ratio, fraction of the training patients whose endpoints are used,
    #  fine-tuning fusion init, missing-modality handling); the model defaults are "pretrained", "complete"
    P, C = "pretrained", "complete"
    if args.subset == "all":
        runs = [(True, "both", r, 1.0, P, C) for r in ratios]
        runs += [(True, "ct", default_ratio, 1.0, P, C), (True, "clinical", default_ratio, 1.0, P, C)]
        runs += [(False, m, None, 1.0, P, C) for m in ("both", "ct", "clinical")]
        for frac in label_fracs:
            runs += [(True, "both", default_ratio, frac, P, C), (False, "both", None, frac, P, C)]
    else:
        runs = [(True, "both", default_ratio, frac, P, C) for frac in (1.0, *label_fracs)]
    runs += [(True, "both", default_ratio, frac, "fresh", C) for frac in (1.0, *label_fracs)]
    runs += [(True, "both", default_ratio, 1.0, P, "zero")]
    order = torch.randperm(len(train["ct"]), generator=torch.Generator().manual_seed(args.seed))
    pretrained: dict[float, dict] = {}
    rows, risks, models = [], {}, {}
    for do_pre, modalities, ratio, frac, fusion, missing in runs:
        key = (do_pre, modalities, ratio, frac, fusion, missing)
        torch.manual_seed(args.seed)
        cfg = model_config(cohort, args.width, args.depth, mask_ratio_ct=0.75 if ratio is None else ratio,
                           fusion_init=fusion, missing_modality=missing)
        model = create("cmml", **cfg)
        if do_pre:
            if ratio not in pretrained:  # always on every training patient's images and record
                log(f"pretraining, CT mask ratio {ratio}")
                pretrain(model, train, epochs=args.pretrain_epochs, augment=augmentation(args), log=log)
                pretrained[ratio] = {k: v.clone() for k, v in model.state_dict().items()}
            # a fresh fusion keeps its new fuse_* layers: the only weights pretraining does not provide
            missing_keys, unexpected = model.load_state_dict(pretrained[ratio], strict=False)
            assert not unexpected and all(k.startswith("fuse_") for k in missing_keys), (missing_keys, unexpected)
            assert bool(missing_keys) == (fusion == "fresh")
        labelled = train if frac >= 1.0 else {k: v[order[:max(2, round(frac * len(order)))]] for k, v in train.items()}
        log(f"fine-tuning: pretrained={do_pre} modalities={modalities} ratio={ratio} labelled={len(labelled['ct'])} "
            f"fusion={fusion} missing={missing}")
        ft = finetune(model, restrict(labelled, modalities), restrict(val, modalities), epochs=args.finetune_epochs,
                      batch_size=args.finetune_batch, lr=args.finetune_lr, augment=augmentation(args), log=log)
        c = test_cindex(model, restrict(test, modalities), cohort.eta["test"], n_boot=args.n_boot)
        risks[key] = predict(model, restrict(test, modalities))
        models[key] = model
        row = {"pretraining": "on" if do_pre else "off", "modalities": modalities,
               "mask_ratio_ct": "" if ratio is None else ratio, "labelled_patients": len(labelled["ct"]),
               "fusion_init": fusion if do_pre else "-", "missing_modality": missing,
               "best_val_cindex": round(ft["best_val_cindex"], 4)}
        for e in ENDPOINTS:
            row.update({f"{e}_cindex": round(c[e]["cindex"], 4), f"{e}_low": round(c[e]["cindex_low"], 4),
                        f"{e}_high": round(c[e]["cindex_high"], 4), f"{e}_oracle": round(c[e]["oracle"], 4)})
        rows.append(row)
        log(f"  -> {row}")
        with open(out / "cmml_ablation.csv", "w", newline="") as f:  # rewritten after every run
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    base = (True, "both", default_ratio, 1.0, P, C)
    wanted = [("pretraining on - off (both modalities, all labels)", base, (False, "both", None, 1.0, P, C)),
              ("both modalities - CT only (pretrained)", base, (True, "ct", default_ratio, 1.0, P, C)),
              ("both modalities - clinical only (pretrained)", base, (True, "clinical", default_ratio, 1.0, P, C))]
    wanted += [(f"CT mask ratio {default_ratio} - {r}", base, (True, "both", r, 1.0, P, C))
               for r in ratios if r != default_ratio]
    wanted += [(f"pretraining on - off, {frac:.0%} of the labels", (True, "both", default_ratio, frac, P, C),
                (False, "both", None, frac, P, C)) for frac in label_fracs]
    wanted += [(f"fusion from the pretrained layers - fresh fusion, {frac:.0%} of the labels",
                (True, "both", default_ratio, frac, P, C), (True, "both", default_ratio, frac, "fresh", C))
               for frac in (1.0, *label_fracs)]
    contrasts = [(name, paired_difference(risks[a], risks[b], test, n_boot=args.n_boot)) for name, a, b in wanted
                 if a in risks and b in risks]  # --subset fusion runs only some of the rows

    # test-time withholding: the same test patients with their CT / their clinical record marked absent
    log("test-time withholding")
    zero_key = (True, "both", default_ratio, 1.0, P, "zero")
    held_models = [("pretrained fusion, fine-tuned with completion", base),
                   ("fresh fusion, fine-tuned with completion", (True, "both", default_ratio, 1.0, "fresh", C)),
                   ("pretrained fusion, fine-tuned with zero-filling", zero_key)]
    held_rows, held_risks = [], {}
    for label, key in held_models:
        model = models[key]
        for withheld, modalities in (("nothing", "both"), ("CT", "clinical"), ("clinical record", "ct")):
            for fill in (("complete", "zero") if withheld != "nothing" else (key[5],)):
                model.config.missing_modality = fill  # read at every forward: switches the test-time handling
                data = restrict(test, modalities)
                held_risks[(key, withheld, fill)] = predict(model, data)
                c = test_cindex(model, data, cohort.eta["test"], n_boot=args.n_boot)
                held_rows.append({"model": label, "withheld": withheld, "test_fill": fill if withheld != "nothing" else "-",
                                  **{f"{e}_{k}": round(c[e][f"cindex{s}"], 4) for e in ENDPOINTS
                                     for k, s in (("cindex", ""), ("low", "_low"), ("high", "_high"))}})
        model.config.missing_modality = key[5]
    with open(out / "cmml_ablation_withholding.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(held_rows[0]))
        w.writeheader()
        w.writerows(held_rows)
    held_contrasts = []
    for withheld in ("CT", "clinical record"):
        held_contrasts.append((f"{withheld} withheld: completion - zero-filling, same model (fine-tuned with completion)",
                               paired_difference(held_risks[(base, withheld, "complete")],
                                                 held_risks[(base, withheld, "zero")], test, n_boot=args.n_boot)))
        held_contrasts.append((f"{withheld} withheld: completion (fine-tuned with it) - zero-filling (fine-tuned with it)",
                               paired_difference(held_risks[(base, withheld, "complete")],
                                                 held_risks[(zero_key, withheld, "zero")], test, n_boot=args.n_boot)))
    minutes = (time.time() - t0) / 60
    md = ["# CMML ablation on the synthetic survival cohort", "",
          f"`{command_line('cmml_ablation.py')}` (options as given; rows: {args.subset}; pretraining {args.pretrain_epochs} and "
          f"fine-tuning {args.finetune_epochs} epochs, CT mask ratios {args.ratios if args.subset == 'all' else default_ratio}; {minutes:.1f} min on "
          f"{args.threads} shared CPU threads). Same cohort, split and model size as `cmml_synthetic.md` "
          f"({len(test['ct'])} test patients). Pretraining always uses both modalities; \"CT only\" / "
          "\"clinical only\" fine-tune and test with the other modality marked absent (completed from the "
          "present one unless the row says zero). Test C-index with "
          f"bootstrap 95 % intervals ({args.n_boot} resamples).", "",
          *(["With `--subset fusion` only the fusion and missing-modality rows ran; the mask-ratio, modality "
             "and pretraining on/off rows of `--subset all` were last measured on the CMML before pretrained "
             "fusion (this file at commit eb6593e).", ""]
            if args.subset == "fusion" else []),
          "| pretraining | modalities | CT mask ratio | labelled training patients | fine-tuning fusion | "
          "missing modality | PFS C-index [95 % CI] | OS C-index [95 % CI] | best val C-index |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['pretraining']} | {r['modalities']} | {r['mask_ratio_ct'] or '-'} | {r['labelled_patients']} | "
                  f"{r['fusion_init']} | {r['missing_modality']} | "
                  f"{r['pfs_cindex']:.3f} [{r['pfs_low']:.3f}, {r['pfs_high']:.3f}] | "
                  f"{r['os_cindex']:.3f} [{r['os_low']:.3f}, {r['os_high']:.3f}] | {r['best_val_cindex']:.3f} |")
    md += ["", "Paired differences on the same test patients (bootstrap 95 % intervals; an interval that "
               "excludes 0 is a difference this cohort can show):", "",
           "| contrast | PFS C-index difference [95 % CI] | OS C-index difference [95 % CI] |", "|---|---|---|"]
    for name, d in contrasts:
        md.append(f"| {name} | " + " | ".join(f"{d[e][0]:+.3f} [{d[e][1]:+.3f}, {d[e][2]:+.3f}]" for e in ENDPOINTS)
                  + " |")
    md += ["", "## A modality withheld at test time", "",
           "The same test patients with their CT (`ct_mask` False) or their whole clinical record "
           "(`clinical_mask` all False) marked absent. `complete`: the absent modality is completed from the "
           "other one through the pretrained path (CT: mask tokens + positions -> cross-attention to the "
           "record; record: a fully masked record -> cross-attention to the CT -> the graph decoder's "
           "values); `zero`: a zero CT pool / a record of variable identities only (the earlier "
           "behaviour). Fine-tuning drops a whole modality for 10 % of the patients each "
           "(`modality_dropout`), filled the way the model's `missing_modality` says; the test-time fill "
           "is switched on the same weights. Also in `cmml_ablation_withholding.csv`.", "",
           "| model | withheld at test | test-time fill | PFS C-index [95 % CI] | OS C-index [95 % CI] |",
           "|---|---|---|---|---|"]
    for r in held_rows:
        md.append(f"| {r['model']} | {r['withheld']} | {r['test_fill']} | "
                  f"{r['pfs_cindex']:.3f} [{r['pfs_low']:.3f}, {r['pfs_high']:.3f}] | "
                  f"{r['os_cindex']:.3f} [{r['os_low']:.3f}, {r['os_high']:.3f}] |")
    md += ["", "| contrast | PFS C-index difference [95 % CI] | OS C-index difference [95 % CI] |", "|---|---|---|"]
    for name, d in held_contrasts:
        md.append(f"| {name} | " + " | ".join(f"{d[e][0]:+.3f} [{d[e][1]:+.3f}, {d[e][2]:+.3f}]" for e in ENDPOINTS)
                  + " |")
    md += ["", f"Oracle (true log-hazard) on the same test patients: PFS {rows[0]['pfs_oracle']:.3f}, "
               f"OS {rows[0]['os_oracle']:.3f}.", ""]
    (out / "cmml_ablation.md").write_text("\n".join(md))
    log(f"wrote {out}/cmml_ablation.md")


if __name__ == "__main__":
    main()
