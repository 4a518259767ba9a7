"""CMML ablations on the synthetic cohort of experiments/cmml_synthetic.py (not CI).

Rows: pretraining on/off x modalities (CT only / clinical only / both) at the default CT mask
ratio, and the CT mask ratio 0.5 / 0.75 / 0.9 with both modalities. Pretraining always sees both
modalities (that is what it is for); "CT only" / "clinical only" fine-tune and test with the other
modality absent (``clinical_mask`` all False / ``ct_mask`` False). Reports test C-index (PFS, OS)
with bootstrap 95 % intervals, and the oracle. Writes experiments/results/cmml_ablation.{md,csv}.

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
from cmml_common import (ENDPOINTS, add_arguments, augmentation, build_cohort, finetune, fractions, model_config,  # noqa: E402
                         pretrain, restrict, test_cindex)

from lungcore.models import create  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, pretrain_epochs=20, finetune_epochs=25, out=RESULTS)
    ap.add_argument("--ratios", default="0.5,0.75,0.9")
    ap.add_argument("--n-boot", type=int, default=500)
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
    runs = [(True, "both", r) for r in ratios]
    runs += [(True, "ct", default_ratio), (True, "clinical", default_ratio)]
    runs += [(False, m, None) for m in ("both", "ct", "clinical")]
    pretrained: dict[float, dict] = {}
    rows = []
    for do_pre, modalities, ratio in runs:
        torch.manual_seed(args.seed)
        cfg = model_config(cohort, args.width, args.depth, mask_ratio_ct=0.75 if ratio is None else ratio)
        model = create("cmml", **cfg)
        if do_pre:
            if ratio not in pretrained:
                log(f"pretraining, CT mask ratio {ratio}")
                pretrain(model, train, epochs=args.pretrain_epochs, augment=augmentation(args), log=log)
                pretrained[ratio] = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(pretrained[ratio])
        log(f"fine-tuning: pretrained={do_pre} modalities={modalities} ratio={ratio}")
        ft = finetune(model, restrict(train, modalities), restrict(val, modalities), epochs=args.finetune_epochs,
                      batch_size=args.finetune_batch, lr=args.finetune_lr,
                      augment=augmentation(args), log=log)
        c = test_cindex(model, restrict(test, modalities), cohort.eta["test"], n_boot=args.n_boot)
        row = {"pretraining": "on" if do_pre else "off", "modalities": modalities,
               "mask_ratio_ct": "" if ratio is None else ratio, "best_val_cindex": round(ft["best_val_cindex"], 4)}
        for e in ENDPOINTS:
            row.update({f"{e}_cindex": round(c[e]["cindex"], 4), f"{e}_low": round(c[e]["cindex_low"], 4),
                        f"{e}_high": round(c[e]["cindex_high"], 4), f"{e}_oracle": round(c[e]["oracle"], 4)})
        rows.append(row)
        log(f"  -> {row}")
        with open(out / "cmml_ablation.csv", "w", newline="") as f:  # rewritten after every run
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    minutes = (time.time() - t0) / 60
    md = ["# CMML ablation on the synthetic survival cohort", "",
          f"`.venv/bin/python experiments/cmml_ablation.py --n {args.n} --pretrain-epochs {args.pretrain_epochs} "
          f"--finetune-epochs {args.finetune_epochs} --ratios {args.ratios}` ({minutes:.1f} min on {args.threads} "
          f"shared CPU threads). Same cohort, split and model size as `cmml_synthetic.md` "
          f"({len(test['ct'])} test patients). Pretraining always uses both modalities; \"CT only\" / "
          "\"clinical only\" fine-tune and test with the other modality marked absent. Test C-index with "
          f"bootstrap 95 % intervals ({args.n_boot} resamples).", "",
          "| pretraining | modalities | CT mask ratio | PFS C-index [95 % CI] | OS C-index [95 % CI] | best val C-index |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['pretraining']} | {r['modalities']} | {r['mask_ratio_ct'] or '-'} | "
                  f"{r['pfs_cindex']:.3f} [{r['pfs_low']:.3f}, {r['pfs_high']:.3f}] | "
                  f"{r['os_cindex']:.3f} [{r['os_low']:.3f}, {r['os_high']:.3f}] | {r['best_val_cindex']:.3f} |")
    md += ["", f"Oracle (true log-hazard) on the same test patients: PFS {rows[0]['pfs_oracle']:.3f}, "
               f"OS {rows[0]['os_oracle']:.3f}.", ""]
    (out / "cmml_ablation.md").write_text("\n".join(md))
    log(f"wrote {out}/cmml_ablation.md")


if __name__ == "__main__":
    main()
