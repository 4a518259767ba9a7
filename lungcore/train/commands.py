"""``lungcore train | evaluate | predict | demo``: argument parsers and run functions.

Examples:
    $ lungcore train --model cmml --manifest cohort/manifest.csv --out runs/cmml --epochs 20
    $ torchrun --nproc_per_node 4 -m lungcore train --model cmml --manifest M --out runs/cmml --device cuda
    $ lungcore train --model cmml --manifest M --out runs/cmml --resume        # after a crash / kill
    $ lungcore evaluate --checkpoint runs/cmml/best.pt --manifest external.csv --out runs/cmml/external
    $ lungcore predict --checkpoint runs/csf/best.pt --manifest new.csv --out predictions.csv
    $ lungcore demo --out runs/demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ACCUMULATE_HELP = ("micro-batches per optimiser step (effective batch = batch size x accumulate x GPUs). "
                   "With a Cox loss (CMML fine-tuning) each micro-batch is its own risk set: accumulation "
                   "averages the gradients of per-micro-batch partial likelihoods and does NOT enlarge the "
                   "risk sets; more GPUs do (their risk sets are gathered across ranks)")


def _errors():
    from lungcore.data import ManifestError
    from lungcore.train.loop import NonFiniteLossError

    return (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError, ManifestError)


def _fail(command: str, exc: BaseException) -> int:
    print(f"lungcore {command}: error: {exc}", file=sys.stderr)
    return 1


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="network: cmml or csfnet (see `lungcore.models.available_models()`)")
    p.add_argument("--manifest", type=Path, help="cohort manifest (CSV, schema beside it)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics.csv, report/")
    p.add_argument("--config", type=Path, help="YAML with TrainConfig fields (flags override it)")
    p.add_argument("--stage", help="pretrain|finetune|both for CMML (default: every stage of the model)")
    p.add_argument("--epochs", type=int, help="epochs per stage")
    p.add_argument("--batch-size", type=int, help="samples per micro-batch per process")
    p.add_argument("--accumulate", type=int, help=ACCUMULATE_HELP)
    p.add_argument("--lr", type=float, help="peak learning rate (cosine schedule with warm-up)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int)
    p.add_argument("--patience", type=int, help="early stopping: epochs without validation improvement")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--recipe", choices=["lungcore", "paper"],
                   help="paper: the optimiser and schedule the model's paper published (CSF-Net: Adam 1e-4, "
                        "betas (0.5, 0.999), cosine warm restarts); --lr still overrides the rate")


def train(args: argparse.Namespace) -> int:
    from lungcore.train.loop import fit

    stage = {"both": "all"}.get(args.stage, args.stage)
    try:
        result = fit(args.config, out=args.out, resume=args.resume, model=args.model,
                     manifest=str(args.manifest) if args.manifest else None, stage=stage, epochs=args.epochs,
                     batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr, device=args.device,
                     precision=args.precision, seed=args.seed, patience=args.patience,
                     num_workers=args.num_workers, progress=False if args.no_progress else None,
                     recipe=args.recipe)
    except _errors() as exc:
        return _fail("train", exc)
    if result.test_metrics:
        print(json.dumps({k: v for k, v in result.test_metrics.items() if not k.endswith(("_low", "_high"))},
                         indent=1, default=float))
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


def evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by lungcore train")
    p.add_argument("--manifest", type=Path, required=True, help="labelled manifest to evaluate on")
    p.add_argument("--out", type=Path, help="report folder (summary.md, PNGs, metrics.json)")
    p.add_argument("--reference-manifest", type=Path,
                   help="survival: the training cohort (Breslow baseline, censoring weights); default: the "
                        "evaluated cohort itself")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"])


def evaluate(args: argparse.Namespace) -> int:
    from lungcore.train.loop import evaluate as run

    try:
        metrics = run(args.checkpoint, args.manifest, args.out, batch_size=args.batch_size, device=args.device,
                      reference_manifest=args.reference_manifest)
    except _errors() as exc:
        return _fail("evaluate", exc)
    print(json.dumps(metrics, indent=1, default=float))
    return 0


def predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by lungcore train")
    p.add_argument("--manifest", type=Path, required=True, help="manifest to predict (endpoints/labels optional)")
    p.add_argument("--out", type=Path, required=True, help="CSV: one row per manifest row (risks or probability)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"])


def predict(args: argparse.Namespace) -> int:
    from lungcore.train.loop import predict as run

    try:
        frame = run(args.checkpoint, args.manifest, args.out, batch_size=args.batch_size, device=args.device)
    except _errors() as exc:
        return _fail("predict", exc)
    print(f"wrote {len(frame)} rows to {args.out}")
    return 0


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for cohorts, runs and reports")
    p.add_argument("--quick", action="store_true", help="smaller cohorts and fewer epochs (a smoke test)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo's small models are overhead-bound and more "
                        "threads than free cores slowed them 4x on a shared 2-core machine; 0 = torch's choice)")


def demo(args: argparse.Namespace) -> int:
    from lungcore.train.demo import run_demo

    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_demo(args.out, quick=args.quick, device=args.device, seed=args.seed)
    except _errors() as exc:
        return _fail("demo", exc)
    finally:
        torch.set_num_threads(threads)
    return 0
