"""CMML ablations on the synthetic cohort of experiments/cmml_synthetic.py (not CI).

Rows: pretraining on/off x modalities (CT only / clinical only / both) at the default CT mask
ratio, the CT mask ratio 0.5 / 0.75 / 0.9 with both modalities, and pretraining on/off when only a
fraction of the training patients have endpoints (``--label-fractions``; pretraining still uses
every training patient's images and record: the label-scarce setting masked pretraining is for).
Pretraining always sees both modalities; "CT only" / "clinical only" fine-tune and test with the
other modality absent (``clinical_mask`` all False / ``ct_mask`` False). Reports test C-index (PFS,
OS) with bootstrap 95 % intervals, the oracle, and paired bootstrap intervals of the differences
that answer the ablation's questions. Writes experiments/results/cmml_ablation.{md,csv}.

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
                         test_cindex)

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    cohort = build_cohort(Path(args.workdir), args.n, args.seed, fractions(args), log=log)
    train, val, test = (cohort.splits[k] for k in ("train", "val", "test"))
    ratios = [float(r) for r in args.ratios.split(",")]
    default_ratio = 0.75 if 0.75 in ratios else ratios[0]
    label_fracs = [float(f) for f in args.label_fractions.split(",") if f.strip()]
    # (pretraining, modalities, CT mask ratio, fraction of the training patients whose endpoints are used)
    runs = [(True, "both", r, 1.0) for r in ratios]
    runs += [(True, "ct", default_ratio, 1.0), (True, "clinical", default_ratio, 1.0)]
    runs += [(False, m, None, 1.0) for m in ("both", "ct", "clinical")]
    for frac in label_fracs:
        runs += [(True, "both", default_ratio, frac), (False, "both", None, frac)]
    order = torch.randperm(len(train["ct"]), generator=torch.Generator().manual_seed(args.seed))
    pretrained: dict[float, dict] = {}
    rows, risks = [], {}
    for do_pre, modalities, ratio, frac in runs:
        torch.manual_seed(args.seed)
        cfg = model_config(cohort, args.width, args.depth, mask_ratio_ct=0.75 if ratio is None else ratio)
        model = create("cmml", **cfg)
        if do_pre:
            if ratio not in pretrained:  # always on every training patient's images and record
                log(f"pretraining, CT mask ratio {ratio}")
                pretrain(model, train, epochs=args.pretrain_epochs, augment=augmentation(args), log=log)
                pretrained[ratio] = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(pretrained[ratio])
        labelled = train if frac >= 1.0 else {k: v[order[:max(2, round(frac * len(order)))]] for k, v in train.items()}
        log(f"fine-tuning: pretrained={do_pre} modalities={modalities} ratio={ratio} labelled={len(labelled['ct'])}")
        ft = finetune(model, restrict(labelled, modalities), restrict(val, modalities), epochs=args.finetune_epochs,
                      batch_size=args.finetune_batch, lr=args.finetune_lr, augment=augmentation(args), log=log)
        c = test_cindex(model, restrict(test, modalities), cohort.eta["test"], n_boot=args.n_boot)
        risks[(do_pre, modalities, ratio, frac)] = predict(model, restrict(test, modalities))
        row = {"pretraining": "on" if do_pre else "off", "modalities": modalities,
               "mask_ratio_ct": "" if ratio is None else ratio, "labelled_patients": len(labelled["ct"]),
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
    base = (True, "both", default_ratio, 1.0)
    wanted = [("pretraining on - off (both modalities, all labels)", base, (False, "both", None, 1.0)),
              ("both modalities - CT only (pretrained)", base, (True, "ct", default_ratio, 1.0)),
              ("both modalities - clinical only (pretrained)", base, (True, "clinical", default_ratio, 1.0))]
    wanted += [(f"CT mask ratio {default_ratio} - {r}", base, (True, "both", r, 1.0)) for r in ratios if r != default_ratio]
    wanted += [(f"pretraining on - off, {frac:.0%} of the labels", (True, "both", default_ratio, frac),
                (False, "both", None, frac)) for frac in label_fracs]
    contrasts = [(name, paired_difference(risks[a], risks[b], test, n_boot=args.n_boot)) for name, a, b in wanted]
    minutes = (time.time() - t0) / 60
    md = ["# CMML ablation on the synthetic survival cohort", "",
          f"`{command_line('cmml_ablation.py')}` (options as given; pretraining {args.pretrain_epochs} and "
          f"fine-tuning {args.finetune_epochs} epochs, CT mask ratios {args.ratios}; {minutes:.1f} min on "
          f"{args.threads} shared CPU threads). Same cohort, split and model size as `cmml_synthetic.md` "
          f"({len(test['ct'])} test patients). Pretraining always uses both modalities; \"CT only\" / "
          "\"clinical only\" fine-tune and test with the other modality marked absent. Test C-index with "
          f"bootstrap 95 % intervals ({args.n_boot} resamples).", "",
          "| pretraining | modalities | CT mask ratio | labelled training patients | PFS C-index [95 % CI] | "
          "OS C-index [95 % CI] | best val C-index |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['pretraining']} | {r['modalities']} | {r['mask_ratio_ct'] or '-'} | {r['labelled_patients']} | "
                  f"{r['pfs_cindex']:.3f} [{r['pfs_low']:.3f}, {r['pfs_high']:.3f}] | "
                  f"{r['os_cindex']:.3f} [{r['os_low']:.3f}, {r['os_high']:.3f}] | {r['best_val_cindex']:.3f} |")
    md += ["", "Paired differences on the same test patients (bootstrap 95 % intervals; an interval that "
               "excludes 0 is a difference this cohort can show):", "",
           "| contrast | PFS C-index difference [95 % CI] | OS C-index difference [95 % CI] |", "|---|---|---|"]
    for name, d in contrasts:
        md.append(f"| {name} | " + " | ".join(f"{d[e][0]:+.3f} [{d[e][1]:+.3f}, {d[e][2]:+.3f}]" for e in ENDPOINTS)
                  + " |")
    md += ["", f"Oracle (true log-hazard) on the same test patients: PFS {rows[0]['pfs_oracle']:.3f}, "
               f"OS {rows[0]['os_oracle']:.3f}.", ""]
    (out / "cmml_ablation.md").write_text("\n".join(md))
    log(f"wrote {out}/cmml_ablation.md")


if __name__ == "__main__":
    main()
