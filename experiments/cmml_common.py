"""Shared pieces of the CMML experiment scripts (not CI): a synthetic cohort held in memory,
a small training loop for the two stages, and the evaluations.

The general training loop/CLI is lungcore.train (issue 10); this one is deliberately minimal so
the statistical scripts depend only on the model contract (``loss(batch, stage)``, ``predict``),
but it builds its optimiser and schedule with ``lungcore.train.schedule``, as ``lungcore train``
does (so the T2G column embeddings train at ``graph_column_lr`` here too).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungcore.data import Augmentation, CohortDataset, PreprocessSettings, read_manifest, split_by_patient, synth_cohort
from lungcore.metrics import bootstrap_ci, concordance_index
from lungcore.models import create
from lungcore.train import schedule
from lungcore.train.config import OptimConfig, TrainConfig

ENDPOINTS = ("pfs", "os")
KEYS = ("ct", "ct_mask", "clinical", "clinical_mask", "pfs_time", "pfs_event", "pfs_mask", "os_time", "os_event",
        "os_mask")


@dataclass
class Cohort:
    splits: dict[str, dict[str, torch.Tensor]]
    eta: dict[str, np.ndarray]  # the generator's true log-hazard per split
    cardinalities: list[int]
    info: dict[str, Any] = field(default_factory=dict)
    ids: dict[str, np.ndarray] = field(default_factory=dict)  # patient ids per split, in the tensors' order


def build_cohort(workdir: Path, n: int, seed: int, fractions=(0.5, 0.1, 0.4),
                 spacing=(4.0, 3.0, 3.0), crop=(8, 16, 16), log=print, preset: str = "tiny",
                 effects: str = "linear") -> Cohort:
    """Write (once) a synthetic survival cohort, preprocess it, hold every split as tensors."""
    workdir = Path(workdir)
    manifest_path = workdir / "manifest.csv"
    t0 = time.time()
    if not synth_cohort("survival", workdir, n=n, preset=preset, seed=seed, dicom_every=0, reuse=True,
                        effects=effects)["reused"]:
        log(f"synthetic cohort of {n} patients written in {time.time() - t0:.0f} s")
    manifest = read_manifest(manifest_path)
    parts = split_by_patient(manifest, fractions, seed=seed)
    truth = {r["patient_id"]: float(r["eta"]) for r in csv.DictReader(open(workdir / "truth.csv"))}
    train_manifest = manifest.subset(parts["train"]) if hasattr(manifest, "subset") else None
    schema = (train_manifest or manifest).fit_schema()
    ds = CohortDataset(manifest, schema, PreprocessSettings(spacing=spacing, crop=crop),
                       cache_dir=workdir / "cache")
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=0)
    rows: dict[str, list] = {k: [] for k in (*KEYS, "id")}
    for batch in loader:
        for k in rows:
            rows[k].extend(batch[k]) if k == "id" else rows[k].append(batch[k])
    full = {k: torch.cat(v) for k, v in rows.items() if k != "id"}
    ids = np.asarray(rows["id"])
    splits, eta, split_ids = {}, {}, {}
    for name, idx in parts.items():
        idx_t = torch.as_tensor(sorted(idx))
        splits[name] = {k: v[idx_t] for k, v in full.items()}
        split_ids[name] = np.asarray([str(ids[i]) for i in sorted(idx)])
        eta[name] = np.asarray([truth[i] for i in split_ids[name]])
    log(f"cohort ready in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
    return Cohort(splits, eta, schema.cardinalities(), {"n": n, "seed": seed, "spacing": spacing, "crop": crop,
                                                         "preset": preset, "effects": effects}, split_ids)


def add_arguments(ap, *, pretrain_epochs: int, finetune_epochs: int, out: Path) -> None:
    """The command-line options both CMML scripts share (cohort, split, model width, optimisation)."""
    ap.add_argument("--workdir", default="/tmp/cmml_synth", help="where the synthetic cohort is written (reused)")
    ap.add_argument("--n", type=int, default=1400, help="patients in the synthetic cohort")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", default="0.5,0.1,0.4", help="train,val,test fractions (split by patient)")
    ap.add_argument("--pretrain-epochs", type=int, default=pretrain_epochs)
    ap.add_argument("--finetune-epochs", type=int, default=finetune_epochs)
    ap.add_argument("--finetune-batch", type=int, default=64, help="patients per Cox fine-tuning batch (risk sets)")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=48, help="CT encoder and graph Transformer width")
    ap.add_argument("--depth", type=int, default=2, help="Slice-Depth blocks")
    ap.add_argument("--augment", choices=("none", "geometric"), default="none",
                    help="train-time CT augmentation: geometric = random flips of each axis + in-plane rotation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(out))


def augmentation(args) -> Augmentation | None:
    """``--augment geometric``: flips and a +-10 degree in-plane rotation (no intensity jitter: the
    tumour's texture is part of the signal)."""
    return Augmentation(scale=0.0, shift=0.0, noise=0.0) if args.augment == "geometric" else None


def command_line(script: str) -> str:
    """The command that produced a results file, with its options as given (for the report)."""
    import shlex
    import sys

    return " ".join([".venv/bin/python", f"experiments/{script}", *map(shlex.quote, sys.argv[1:])])


def fractions(args) -> tuple[float, float, float]:
    f = tuple(float(x) for x in args.fractions.split(","))
    if len(f) != 3 or abs(sum(f) - 1.0) > 1e-6:
        raise SystemExit(f"--fractions must be three numbers summing to 1, got {args.fractions!r}")
    return f  # type: ignore[return-value]


def model_config(cohort: Cohort, width: int = 48, depth: int = 2, **overrides) -> dict[str, Any]:
    crop = tuple(cohort.info["crop"])
    cfg = dict(img_size=crop, patch_size=(2, 4, 4), embed_dim=width, depth=depth, num_heads=4, mlp_ratio=2.0,
               decoder_dim=32, decoder_depth=1, decoder_heads=2, clinical_dim=width, clinical_depth=2,
               clinical_heads=4, clinical_decoder_depth=1, relation_dim=8, fusion_heads=4,
               clinical_cardinalities=tuple(cohort.cardinalities), dropout=0.1)
    cfg.update(overrides)
    return cfg


def restrict(batch: dict[str, torch.Tensor], modalities: str) -> dict[str, torch.Tensor]:
    """``both``, ``ct`` (no clinical values) or ``clinical`` (no CT) versions of a batch."""
    out = dict(batch)
    if modalities == "ct":
        out["clinical_mask"] = torch.zeros_like(batch["clinical_mask"])
    elif modalities == "clinical":
        out["ct_mask"] = torch.zeros_like(batch["ct_mask"])
    elif modalities != "both":
        raise ValueError(modalities)
    return out


def batches(data: dict[str, torch.Tensor], size: int, gen: torch.Generator, shuffle: bool = True,
            augment: Augmentation | None = None):
    """Mini-batches of a split held as tensors; ``augment`` (train only) transforms each patient's CT."""
    n = len(data["ct"])
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for s in range(0, n, size):
        idx = order[s:s + size]
        b = {k: v[idx] for k, v in data.items()}
        if augment is not None:
            b["ct"] = torch.stack([augment(x, generator=gen) for x in b["ct"]])
        yield b


def optimiser(model, lr: float, epochs: int, n_train: int, batch_size: int):
    """``(optimizer, lr_at)`` of one stage, as ``lungcore.train`` builds them (``schedule.optimizer``:
    no decay on biases and norms, the T2G column embeddings at ``graph_column_lr``; warm-up then
    cosine): ``OptimConfig``'s defaults except this ``lr``, weight decay 0.05 and a warm-up over the
    first 10 % of the stage."""
    optim = OptimConfig(lr=lr, weight_decay=0.05, warmup_epochs=0.1 * epochs)
    opt = schedule.optimizer(model, TrainConfig(optim=optim))
    return opt, schedule.stage_lr(optim, math.ceil(n_train / batch_size), epochs)


def _epoch(model, data, stage: str, opt, lr_at, step: int, batch_size: int, gen: torch.Generator,
           augment: Augmentation | None) -> tuple[float, int]:
    """One pass over ``data`` in train mode from optimiser step ``step`` (clipped gradients, the
    schedule's rate at every step): ``(mean loss, the next step)``."""
    model.train()
    total, count = 0.0, 0
    for b in batches(data, batch_size, gen, augment=augment):
        loss, _ = model.loss(b, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        schedule.set_lr(opt, lr_at(step))
        opt.step()
        step += 1
        total, count = total + float(loss.detach()), count + 1
    return total / max(count, 1), step


def pretrain(model, data, *, epochs: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
             augment: Augmentation | None = None, log=print) -> list[float]:
    opt, lr_at = optimiser(model, lr, epochs, len(data["ct"]), batch_size)
    gen = torch.Generator().manual_seed(seed)
    history, step = [], 0
    for ep in range(epochs):
        loss, step = _epoch(model, data, "pretrain", opt, lr_at, step, batch_size, gen, augment)
        history.append(loss)
        if ep < 2 or ep % 5 == 4 or ep == epochs - 1:
            log(f"  pretrain epoch {ep + 1}/{epochs}: loss {history[-1]:.4f}")
    return history


def cindex(risk, time_, event, mask=None) -> float:
    risk, time_, event = (np.asarray(a, dtype=float) for a in (risk, time_, event))
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        risk, time_, event = risk[m], time_[m], event[m]
    return float(concordance_index(risk, time_, event))


def predict(model, data, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Eval-mode risks of a split, per endpoint the model predicts."""
    out = {e: [] for e in model.endpoints}
    for b in batches(data, batch_size, torch.Generator(), shuffle=False):
        r = model.predict(b)
        for e in model.endpoints:
            out[e].append(r[e])
    return {e: torch.cat(v).numpy() for e, v in out.items()}


def mean_cindex(model, data) -> float:
    """Mean over the model's endpoints of the split's C-index (a missing ``{e}_mask`` = every patient)."""
    r = predict(model, data)
    return float(np.mean([cindex(r[e], data[f"{e}_time"], data[f"{e}_event"], data.get(f"{e}_mask"))
                          for e in model.endpoints]))


def finetune(model, train, val, *, epochs: int, batch_size: int = 64, lr: float = 1e-3,
             seed: int = 0, augment: Augmentation | None = None, log=print) -> dict[str, Any]:
    """Cox fine-tuning; keeps the weights of the epoch with the best validation C-index (mean of PFS/OS)."""
    opt, lr_at = optimiser(model, lr, epochs, len(train["ct"]), batch_size)
    gen = torch.Generator().manual_seed(seed + 1)
    best, best_state, history, step = -1.0, None, [], 0
    for ep in range(epochs):
        _, step = _epoch(model, train, "finetune", opt, lr_at, step, batch_size, gen, augment)
        c = mean_cindex(model, val)
        history.append(c)
        if c > best:
            best, best_state = c, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if ep < 2 or ep % 5 == 4 or ep == epochs - 1:
            log(f"  finetune epoch {ep + 1}/{epochs}: val C-index {c:.4f} (best {best:.4f})")
    model.load_state_dict(best_state)
    return {"best_val_cindex": best, "history": history}


def test_cindex(model, data, eta, n_boot: int = 1000) -> dict[str, dict[str, float]]:
    """Per endpoint: model and oracle C-index with bootstrap 95 % intervals, and the paired gap."""
    r = predict(model, data)
    gaps = paired_difference({e: eta for e in ENDPOINTS}, r, data, n_boot=n_boot)  # oracle - model
    out = {}
    for e in ENDPOINTS:
        m = data[f"{e}_mask"].numpy().astype(bool)
        t, ev = data[f"{e}_time"].numpy()[m], data[f"{e}_event"].numpy()[m]
        risk, oracle = r[e][m], eta[m]

        def c(rr, tt, ee):
            return float(concordance_index(rr, tt, ee))

        model_ci = bootstrap_ci(c, risk, t, ev, n_boot=n_boot, seed=1)
        oracle_ci = bootstrap_ci(c, oracle, t, ev, n_boot=n_boot, seed=1)
        out[e] = {"n": int(m.sum()), "events": int(ev.sum()),
                  "cindex": model_ci[0], "cindex_low": model_ci[1], "cindex_high": model_ci[2],
                  "oracle": oracle_ci[0], "oracle_low": oracle_ci[1], "oracle_high": oracle_ci[2],
                  "gap": gaps[e][0], "gap_low": gaps[e][1], "gap_high": gaps[e][2]}
    return out


def paired_difference(risk_a: dict[str, np.ndarray], risk_b: dict[str, np.ndarray], data,
                      n_boot: int = 1000, endpoints=ENDPOINTS) -> dict[str, tuple[float, float, float]]:
    """Per endpoint: C-index of ``risk_a`` minus that of ``risk_b`` on the same patients, with a
    paired percentile bootstrap 95 % interval."""
    out = {}
    for e in endpoints:
        m = data[f"{e}_mask"].numpy().astype(bool)
        t, ev = data[f"{e}_time"].numpy()[m], data[f"{e}_event"].numpy()[m]
        out[e] = bootstrap_ci(lambda a, b, tt, ee: float(concordance_index(a, tt, ee) - concordance_index(b, tt, ee)),
                              risk_a[e][m], risk_b[e][m], t, ev, n_boot=n_boot, seed=1)
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=float) + "\n")


def _features(d: dict[str, torch.Tensor], with_ct: bool):
    """Linear-Cox design of a split: clinical dummies (+ handcrafted CT size, density and texture features)."""
    import pandas as pd

    x, m = d["clinical"].numpy(), d["clinical_mask"].numpy()
    cols = {"age": np.where(m[:, 0], x[:, 0], 0.0), "pdl1": np.where(m[:, 4], x[:, 4], 0.0),
            "ecog1": ((x[:, 2] == 1) & m[:, 2]).astype(float), "ecog2": ((x[:, 2] == 2) & m[:, 2]).astype(float),
            "stage4": ((x[:, 3] == 1) & m[:, 3]).astype(float)}
    if with_ct:
        ct = d["ct"][:, 0]
        dd, hh, ww = ct.shape[1:]
        centre = ct[:, dd // 4: dd - dd // 4, hh // 4: hh - hh // 4, ww // 4: ww - ww // 4]
        lesion = centre > (-400.0 + 1200.0) / 1800.0  # denser than -400 HU in the [-1200, 600] HU window
        n_les = lesion.sum((1, 2, 3)).clamp(min=1)
        mu = (centre * lesion).sum((1, 2, 3)) / n_les
        cols["ct_lesion_fraction"] = lesion.float().mean((1, 2, 3)).numpy()
        cols["ct_lesion_mean"] = mu.numpy()
        cols["ct_lesion_std"] = torch.sqrt(((centre - mu[:, None, None, None]) ** 2 * lesion).sum((1, 2, 3))
                                           / n_les).numpy()
    return pd.DataFrame(cols)


def linear_cox_reference(train, test) -> dict[str, dict[str, float]]:
    """Test C-index of lifelines' CoxPHFitter on the clinical variables, and with three handcrafted
    CT features (fraction of voxels denser than -400 HU around the crop centre ~ tumour size, their
    mean ~ density, their spread ~ heterogeneity): what a linear model
    extracts from the same inputs."""
    from lifelines import CoxPHFitter

    out: dict[str, dict[str, float]] = {}
    for with_ct, name in ((False, "clinical"), (True, "clinical+ct_features")):
        out[name] = {}
        for e in ENDPOINTS:
            mt, mm = train[f"{e}_mask"].numpy().astype(bool), test[f"{e}_mask"].numpy().astype(bool)
            df = _features(train, with_ct)
            df["T"], df["E"] = train[f"{e}_time"].numpy(), train[f"{e}_event"].numpy()
            cph = CoxPHFitter(penalizer=0.01).fit(df[mt], "T", "E")
            r = cph.predict_log_partial_hazard(_features(test, with_ct)).to_numpy()
            out[name][e] = cindex(r[mm], test[f"{e}_time"].numpy()[mm], test[f"{e}_event"].numpy()[mm])
    return out


def start(args) -> tuple[Path, Any, float]:
    """Threads, the output folder and a timestamped logger for an experiment script:
    ``(out, log, t0)`` with ``log(msg)`` printing ``[seconds since t0] msg``."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    return out, log, t0

