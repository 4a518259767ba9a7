"""What CSF-Net's input crops still carry of the morphology cohort's effects, at 2 mm and at 1 mm (not CI).

CSF-Net at CPU size (``csfnet_nonlinear.py``) sees each nodule through T0 and T1 crops of 8 x 16 x 16
voxels at 2 mm; on 6,400 nodules it ties the radiomics baselines but does not learn the generator's
part-solid x growth interaction (a part-solid nodule at T0, solid fraction 0.2-0.8, that grows), which
gradient-boosted trees on the *true-mask* features partly learn. Is that information still in the
crops? This script measures it without a network, on the same field of view (16 x 32 x 32 mm) at two
resolutions, 2 mm (CSF-Net's CPU crops) and 1 mm (16 x 32 x 32 voxels; the published crops are
16 x 64 x 64 at 1 mm):

- each crop is segmented the simple way (voxels denser than -800 HU, the connected part that holds
  the centre or lies nearest to it) and measured: lesion volume, solid volume (> -300 HU), their
  ratio (the solid fraction), mean and SD of the lesion's HU, at T0 and T1, and their changes;
- how well those measurements track the generator's truth (Spearman correlation of the crop solid
  fraction at T0 with the true one, of the crop log volume ratio with the true growth; accuracy of
  "part-solid at T0" read from the crop);
- the same boosted trees as ``handcrafted.boosted_fit_predict`` on clinical + crop features at each
  resolution, next to clinical + true-mask features: AUC on the same test nodules, paired
  differences, and what each responds to (``handcrafted.learned_terms``);
- a supervised probe, not bound to a threshold: CSF-Net's own image encoder (``SpatialEncoder`` at the
  CPU widths of ``csfnet_synthetic.REDUCED``, global average pooling, a linear output) trained on the
  T0 crops of the training nodules to regress the *true* solid fraction at T0 (``--probe-epochs``, Adam,
  epoch chosen on validation), scored on the test nodules: what the crops carry of the interaction's
  ingredient when a network is told what to read.

    .venv/bin/python experiments/csfnet_crops.py --workdir /tmp/csf_big --n 6400  # csfnet_nonlinear_n6400.md's cohort

Writes experiments/results/csfnet_crops.{md,csv}.
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
from csfnet_nonlinear import RESOLUTIONS, clinical_design, planted_terms  # noqa: E402
from csfnet_synthetic import REDUCED, load_tensors  # noqa: E402
from handcrafted import (BOOSTED_MAX_TREES, boosted_fit_predict, learned_table, learned_terms,  # noqa: E402
                         preset_text, truth_features, with_changes, write_rows_csv)

from lungcore.data import CohortDataset, PreprocessSettings, read_manifest, split_by_patient, synth_cohort  # noqa: E402
from lungcore.metrics import bootstrap_ci, roc_auc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = (-1200.0, 600.0)            # the preprocessing window (PreprocessSettings' default)
LESION_HU, SOLID_HU = -800.0, -300.0  # lung ~ -850 HU; ground glass -750 to -450; solid above -300
MEASURES = ("volume_mm3", "solid_mm3", "solid_fraction", "mean_hu", "sd_hu")


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences."""
    return float(pd.Series(np.asarray(a, dtype=float)).corr(pd.Series(np.asarray(b, dtype=float)), method="spearman"))


def crop_measures(crops: np.ndarray, spacing: tuple[float, float, float]) -> pd.DataFrame:
    """Lesion measures of (N, D, H, W) crops in [0, 1] (the window): the > -800 HU part connected to
    the centre (or nearest to it), its volume, solid (> -300 HU) volume and fraction, HU mean and SD."""
    from scipy import ndimage

    hu = WINDOW[0] + (WINDOW[1] - WINDOW[0]) * crops.astype(np.float64)
    voxel = float(np.prod(spacing))
    centre = (np.asarray(crops.shape[1:]) - 1) / 2.0
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in crops.shape[1:]), indexing="ij"), axis=-1)
    dist = np.linalg.norm((grid - centre) * np.asarray(spacing), axis=-1)
    rows = []
    for h in hu:
        labels, n = ndimage.label(h > LESION_HU)
        if n == 0:
            rows.append(dict.fromkeys(MEASURES, 0.0))
            continue
        nearest = ndimage.minimum(dist, labels, index=np.arange(1, n + 1))
        lesion = labels == 1 + int(np.argmin(nearest))
        values = h[lesion]
        solid = float((values > SOLID_HU).sum()) * voxel
        volume = float(lesion.sum()) * voxel
        rows.append({"volume_mm3": volume, "solid_mm3": solid, "solid_fraction": solid / volume,
                     "mean_hu": float(values.mean()), "sd_hu": float(values.std())})
    return pd.DataFrame(rows)


def crop_features(ct: torch.Tensor, spacing) -> pd.DataFrame:
    """T0, T1 and T1 - T0 measures of (N, 2, 1, D, H, W) crops; volumes also as log ratios."""
    t0, t1 = (crop_measures(ct[:, t, 0].numpy(), spacing) for t in (0, 1))
    out = pd.concat([t0.add_prefix("t0_"), t1.add_prefix("t1_"), (t1 - t0).add_prefix("delta_")], axis=1)
    for m in ("volume_mm3", "solid_mm3"):
        out[f"log_ratio_{m}"] = np.log((t1[m] + 1.0) / (t0[m] + 1.0))
    return out


def solid_fraction_probe(t0: torch.Tensor, target: np.ndarray, splits: dict[str, np.ndarray], epochs: int,
                         seed: int = 0, batch_size: int = 64) -> tuple[np.ndarray, int]:
    """CSF-Net's image encoder (CPU widths) + global average pooling + a linear output, trained with Adam
    (lr 1e-3) on ``t0[splits["train"]]`` (N, 1, D, H, W) to regress ``target`` (MSE), the epoch with the
    best validation Spearman kept; returns its test predictions and that epoch."""
    from lungcore.models.csfnet import CSFNetConfig, SpatialEncoder

    torch.manual_seed(seed)
    cfg = CSFNetConfig(**{k: REDUCED[k] for k in ("stem_width", "stages", "cbam_reduction")})
    net = torch.nn.Sequential(SpatialEncoder(cfg), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
                              torch.nn.Linear(cfg.stages[-1][-1], 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    y = torch.as_tensor(target, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)

    def predict(rows: np.ndarray) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            return torch.cat([net(t0[torch.as_tensor(rows[i:i + 256])])[:, 0]
                              for i in range(0, len(rows), 256)]).numpy()

    best, best_epoch, best_state = -np.inf, 0, None
    train = torch.as_tensor(splits["train"])
    for epoch in range(1, epochs + 1):
        net.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            loss = torch.nn.functional.mse_loss(net(t0[rows])[:, 0], y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = spearman(predict(splits["val"]), target[splits["val"]])
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    if best_state is not None:  # None: no validation score (a smoke-test cohort); the last epoch stays
        net.load_state_dict(best_state)
    return predict(splits["test"]), best_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/csfnet_nonlinear", help="where the cohorts are written (reused)")
    ap.add_argument("--n", type=int, default=1600, help="nodules in the morphology cohort")
    ap.add_argument("--seed", type=int, default=0, help="generator and split seed")
    ap.add_argument("--preset", choices=("fine", "tiny"), default="fine",
                    help="synthetic volume preset (fine: the committed results; tiny: smoke runs)")
    ap.add_argument("--boosted-trees", type=int, default=BOOSTED_MAX_TREES)
    ap.add_argument("--resolutions", nargs="+", choices=tuple(RESOLUTIONS), default=list(RESOLUTIONS),
                    help="which crops to measure (default: both)")
    ap.add_argument("--probe-epochs", type=int, default=8, help="epochs of the solid-fraction probe (0: none)")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    out, log, t0 = start(args)

    work = Path(args.workdir) / "morphology"
    info = synth_cohort("nodules", work, n=args.n, preset=args.preset, seed=args.seed, dicom_every=0, reuse=True,
                        effects="morphology")
    manifest = read_manifest(info["manifest"])
    splits = {k: np.asarray(v) for k, v in split_by_patient(manifest, (0.55, 0.15, 0.30), seed=args.seed).items()}
    schema = manifest.subset(splits["train"].tolist()).fit_schema()
    cards = schema.cardinalities()
    truth_csv = work / "truth.csv"
    truth = pd.read_csv(truth_csv, dtype={"nodule_id": str}).set_index("nodule_id")
    ids = np.asarray(manifest.ids)
    designs: dict[str, pd.DataFrame] = {}
    agreement = []
    data = None
    t = truth.loc[ids]
    f0 = t["solid_t0"].to_numpy()
    part_solid = (f0 >= 0.2) & (f0 <= 0.8)
    inner = (t["pleural"] == 0).to_numpy()
    for name, (spacing, crop) in ((k, RESOLUTIONS[k]) for k in args.resolutions):
        data = load_tensors(CohortDataset(manifest, schema, PreprocessSettings(spacing=spacing, crop=crop),
                                          cache_dir=work / "cache"))
        designs[name] = feats = crop_features(data["ct"], spacing)
        read = feats["t0_solid_fraction"].between(0.2, 0.8).to_numpy()
        agreement.append({
            "crops": name, "solid_fraction_spearman": spearman(f0, feats["t0_solid_fraction"]),
            "solid_fraction_spearman_inner": spearman(f0[inner], feats["t0_solid_fraction"][inner]),
            "median_volume_inner": float(np.median(feats["t0_volume_mm3"][inner])),
            "true_median_volume_inner": float(np.median(np.pi / 6 * t["diameter_t0_mm"].to_numpy()[inner] ** 3)),
            "growth_spearman": spearman(t["log_growth"], feats["log_ratio_volume_mm3"]),
            "part_solid_accuracy": float((read == part_solid).mean()),
            "lesion_found": float((feats["t0_volume_mm3"] > 0).mean())})
        if args.probe_epochs:
            pred, epoch = solid_fraction_probe(data["ct"][:, 0], f0, splits, args.probe_epochs)
            te_f0 = f0[splits["test"]]
            agreement[-1].update(probe_spearman=spearman(te_f0, pred), probe_epoch=epoch,
                                 probe_part_solid_accuracy=float((((pred >= 0.2) & (pred <= 0.8))
                                                                  == ((te_f0 >= 0.2) & (te_f0 <= 0.8))).mean()),
                                 threshold_spearman_test=spearman(te_f0, feats["t0_solid_fraction"].to_numpy()
                                                                  [splits["test"]]))
        log(f"{name}: {agreement[-1]}")
    designs["true mask"] = with_changes(truth_features(truth_csv, "nodule_id", ids, prefixes=("feat_t0_", "feat_t1_")))

    y = data["label"].numpy().astype(int)
    tr, va, te = splits["train"], splits["val"], splits["test"]
    groups = np.asarray([manifest.patient_ids[i] for i in te])
    clin = {k: clinical_design(data, rows, cards) for k, rows in (("train", tr), ("val", va), ("test", te))}
    probs, choices = {}, {}
    for name, feats in designs.items():
        part = {k: clin[k].join(feats.iloc[rows].reset_index(drop=True))
                for k, rows in (("train", tr), ("val", va), ("test", te))}
        probs[f"boosted trees, {name} features"], choices[name] = boosted_fit_predict(
            (part["train"], y[tr], None), (part["val"], y[va], None), part["test"], max_trees=args.boosted_trees)
        log(f"{name}: {choices[name]}")
    probs["oracle"] = truth.loc[ids[te], "logit"].to_numpy()
    reference = "boosted trees, true mask features"
    rows, learned = [], []
    terms = planted_terms(truth, ids[te], "morphology")
    for name, p in probs.items():
        auc = bootstrap_ci(roc_auc, y[te], p, n_boot=args.n_boot, seed=1, groups=groups)
        d = bootstrap_ci(lambda yy, a, b: roc_auc(yy, a) - roc_auc(yy, b), y[te], p, probs[reference],
                         n_boot=args.n_boot, seed=1, groups=groups)
        rows.append({"model": name, "auc": auc[0], "low": auc[1], "high": auc[2], "minus_true_mask": d[0],
                     "mt_low": d[1], "mt_high": d[2]})
        learned.append({"effects": "morphology", "model": name, "terms": learned_terms(p, terms)})
        log(f"{name}: AUC {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}]; - true-mask trees {d[0]:+.3f} "
            f"[{d[1]:+.3f}, {d[2]:+.3f}]")
    write(out, args, info, len(te), agreement, rows, learned, choices, (time.time() - t0) / 60)
    log("done")


def write(out: Path, args, info: dict, n_test: int, agreement: list[dict], rows: list[dict], learned: list[dict],
          choices: dict, minutes: float) -> None:
    write_rows_csv(out / "csfnet_crops.csv", rows)

    def ci(v, lo, hi, signed=False):
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(v)} [{f.format(lo)}, {f.format(hi)}]"

    md = [f"# What CSF-Net's input crops carry of the morphology effects, at {' and at '.join(args.resolutions)}", "",
          f"`{command_line('csfnet_crops.py')}` ({minutes:.0f} min on {args.threads} shared CPU thread(s), torch "
          f"{torch.__version__}). Morphology cohort, preset `{args.preset}` ({preset_text(args.preset)}), "
          f"{info['n']} nodules of {info['patients']} patients, {n_test} test nodules; split 55/15/30 % by "
          "patient as `csfnet_nonlinear.py`. Crops: "
          + "; ".join(f"{k} = {' x '.join(map(str, RESOLUTIONS[k][1]))} voxels at {RESOLUTIONS[k][0][0]:g} mm"
                      for k in args.resolutions)
          + f" (the same 16 x 32 x 32 mm). Crop lesion = the part denser than {LESION_HU:g} HU connected to the "
          f"centre (or nearest to it); solid = denser than {SOLID_HU:g} HU. Boosted trees: "
          "`handcrafted.boosted_fit_predict` (setting and tree count chosen on validation, refitted on train + "
          f"validation). Patient-grouped bootstrap 95 % intervals ({args.n_boot} resamples, paired).", "",
          "## How well the crop measurements track the truth", "",
          "| crops | lesion found at T0 | solid fraction at T0 vs truth (Spearman; away from the pleura) | "
          "median lesion volume at T0 away from the pleura, mm3 (true) | log volume ratio vs true "
          "growth (Spearman) | part-solid at T0 read right |", "|---|---|---|---|---|---|"]
    md += [f"| {a['crops']} | {a['lesion_found']:.3f} | {a['solid_fraction_spearman']:.3f} "
           f"({a['solid_fraction_spearman_inner']:.3f}) | {a['median_volume_inner']:.0f} "
           f"({a['true_median_volume_inner']:.0f}) | {a['growth_spearman']:.3f} | {a['part_solid_accuracy']:.3f} |"
           for a in agreement]
    if "probe_spearman" in agreement[0]:
        md += ["", f"Supervised probe (CSF-Net's encoder at the CPU widths regressing the true solid fraction at T0 "
               f"from the T0 crop; {args.probe_epochs} epochs, epoch chosen on validation), on the test nodules:", "",
               "| crops | probe: solid fraction vs truth (Spearman) | threshold segmentation, same nodules | probe: "
               "part-solid read right | epoch |", "|---|---|---|---|---|"]
        md += [f"| {a['crops']} | {a['probe_spearman']:.3f} | {a['threshold_spearman_test']:.3f} | "
               f"{a['probe_part_solid_accuracy']:.3f} | {a['probe_epoch']} |" for a in agreement]
    md += ["", "## Boosted trees on clinical + crop features vs clinical + true-mask features", "",
           "| model | AUC | model - true-mask trees | setting (rate, depth, trees) |", "|---|---|---|---|"]
    for r in rows:
        c = choices.get(r["model"].removeprefix("boosted trees, ").removesuffix(" features"))
        md.append(f"| {r['model']} | {ci(r['auc'], r['low'], r['high'])} | "
                  f"{ci(r['minus_true_mask'], r['mt_low'], r['mt_high'], True)} | "
                  + (f"{c['learning_rate']:g}, {c['size']}, {c['trees']}" if c else "") + " |")
    md += ["", "## What each model's output responds to", "",
           "Least-squares coefficients of each model's standardised output on the generator's terms "
           "(`handcrafted.learned_terms`, as in `csfnet_nonlinear_n6400.md`).", ""]
    md += learned_table(learned, "terms")
    (out / "csfnet_crops.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
