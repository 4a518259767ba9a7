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
    from lungcore.train.trainer import NonFiniteLossError

    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, NonFiniteLossError, ManifestError)


def _fail(command: str, exc: BaseException) -> int:
    """Print the error on stderr; exit 1 when the data or the run failed, 2 for a usage error
    (see :mod:`lungcore.usage`)."""
    from lungcore.data import ManifestError
    from lungcore.train.trainer import NonFiniteLossError
    from lungcore.usage import EXIT_FAILED, EXIT_USAGE

    print(f"lungcore {command}: error: {exc}", file=sys.stderr)
    return EXIT_FAILED if isinstance(exc, (ManifestError, NonFiniteLossError)) else EXIT_USAGE


def train_args(p: argparse.ArgumentParser) -> None:
    from lungcore.train.config import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", help=f"network: cmml or csfnet (see `lungcore.models.available_models()`; "
                                   f"default: the config's, else {d.model})")
    p.add_argument("--manifest", type=Path, help="cohort manifest (CSV, schema beside it; default: the config's "
                                                 "data.manifest)")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder: checkpoints, metrics.csv, report/ (must be empty or absent unless --resume "
                        "or --overwrite; a cache/ folder in it is fine)")
    p.add_argument("--config", type=Path, help="YAML with TrainConfig fields (a flag given beats the file: --epochs "
                                               "replaces its epochs and stage_epochs; default: none)")
    p.add_argument("--stage", help="one stage of the model (CMML: pretrain or finetune; CSF-Net: train) or all: "
                                   "every stage in order, each from the previous one's best model (default: the "
                                   f"config's, else {d.stage})")
    p.add_argument("--epochs", type=int, help="epochs of every stage: replaces the config's epochs and stage_epochs "
                                              f"(default: the config's, else {d.epochs} per stage); with --resume a "
                                              "larger value trains the current stage (and those after it) longer")
    p.add_argument("--batch-size", type=int,
                   help=f"samples per micro-batch per process (default: {d.data.batch_size})")
    p.add_argument("--accumulate", type=int, help=ACCUMULATE_HELP + f" (default: {d.optim.accumulate})")
    p.add_argument("--lr", type=float,
                   help=f"peak learning rate (cosine schedule with warm-up; default: {d.optim.lr})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto (cuda if available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (default: auto)")
    p.add_argument("--seed", type=int, help=f"seed of every random choice (default: {d.seed})")
    p.add_argument("--patience", type=int, help="early stopping: a stage stops after this many epochs without "
                                                f"validation improvement (>= 0; default: {d.patience} = never)")
    p.add_argument("--num-workers", type=int, help=f"DataLoader worker processes (default: {d.data.num_workers})")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="train-time augmentation of the training split: flips, in-plane rotation, intensity "
                        "jitter, noise; each sample's transform is seeded by the epoch and the sample, so a run "
                        "is the same with any --num-workers (default: the config's data.augment, else "
                        f"{'on' if d.data.augment else 'off'})")
    p.add_argument("--verify", choices=["stat", "content"],
                   help="how the cache recognises a source image: stat (size + modification time, fast) or "
                        f"content (hash every file: catches a rewrite with the same size and time; default: "
                        f"{d.data.verify})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt with the config it was started with "
                        "(a contradicting flag is an error; default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out: its checkpoints, config, splits, metrics, log and report are "
                        "deleted once every check passed (its cache/ and other files stay; default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars on)")
    p.add_argument("--recipe", choices=["lungcore", "paper"],
                   help="paper: the optimiser and schedule the model's paper published (CSF-Net: Adam 1e-4, "
                        "betas (0.9, 0.999), cosine to 0.1x; epochs 25 and batch 1 are yours to pass); --lr still overrides the rate (default: lungcore)")


def train(args: argparse.Namespace) -> int:
    from lungcore.train.loop import fit

    stage = {"both": "all"}.get(args.stage, args.stage)  # "both": what --help said before "all"
    try:
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pick one")
        result = fit(args.config, out=args.out, resume=args.resume, overwrite=args.overwrite, model=args.model,
                     manifest=str(args.manifest) if args.manifest else None, stage=stage, epochs=args.epochs,
                     batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr, device=args.device,
                     precision=args.precision, seed=args.seed, patience=args.patience,
                     num_workers=args.num_workers, progress=False if args.no_progress else None,
                     recipe=args.recipe, verify=args.verify, augment=args.augment)
    except _errors() as exc:
        return _fail("train", exc)
    from lungcore.usage import json_safe

    if result.test_metrics:
        print(json.dumps(json_safe({k: v for k, v in result.test_metrics.items() if not k.endswith(("_low", "_high"))}),
                         indent=1, allow_nan=False))
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


def evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by lungcore train")
    p.add_argument("--manifest", type=Path, required=True, help="labelled manifest to evaluate on")
    p.add_argument("--out", type=Path, help="report folder: summary.md, metrics.json and the plots (default: none: "
                                            "the metrics are printed, no report is written)")
    p.add_argument("--reference-manifest", type=Path,
                   help="survival: the training cohort (Breslow baseline, censoring weights); default: the "
                        "evaluated cohort itself")
    _inference_args(p, "report: the report files lungcore writes in --out (summary.md, metrics.json, its PNGs) "
                       "are replaced, any other file there stays")


def _inference_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (default: 8)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--cache", type=Path, help="crop cache folder (lungcore preprocess --out): crops found there "
                                              "are used, new ones kept (default: a temporary folder, deleted)")
    p.add_argument("--workers", type=int, help="processes reading and cropping the CTs (default: the cores available)")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} (default: refuse it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: bar on)")


def _reading(args: argparse.Namespace) -> dict:
    """``cache_dir`` and ``workers`` of evaluate / predict from ``--cache`` / ``--workers``."""
    from lungcore.data.preprocess import default_workers
    from lungcore.usage import UsageError

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be a positive integer, got {args.workers}")
    return {"cache_dir": args.cache, "workers": args.workers or default_workers()}


def evaluate(args: argparse.Namespace) -> int:
    from lungcore.train.inference import evaluate as run
    from lungcore.usage import json_safe

    try:
        metrics = run(args.checkpoint, args.manifest, args.out, batch_size=args.batch_size, device=args.device,
                      reference_manifest=args.reference_manifest, overwrite=args.overwrite,
                      progress=not args.no_progress, **_reading(args))
    except _errors() as exc:
        return _fail("evaluate", exc)
    print(json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    return 0


def predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by lungcore train")
    p.add_argument("--manifest", type=Path, required=True, help="manifest to predict (endpoints/labels optional)")
    p.add_argument("--out", type=Path, required=True, help="CSV: one row per manifest row (risks or probability)")
    _inference_args(p, "CSV")


def predict(args: argparse.Namespace) -> int:
    from lungcore.train.inference import predict as run

    try:
        frame = run(args.checkpoint, args.manifest, args.out, batch_size=args.batch_size, device=args.device,
                    overwrite=args.overwrite, progress=not args.no_progress, **_reading(args))
    except _errors() as exc:
        return _fail("predict", exc)
    print(f"wrote {len(frame)} rows to {args.out}")
    return 0


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for cohorts, runs and reports")
    p.add_argument("--quick", action="store_true", help="smaller cohorts and fewer epochs (a smoke test)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train (default: auto = cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohorts and the runs (default: 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo's small models are overhead-bound and more "
                        "threads than free cores slowed them 4x on a shared 2-core machine; 0 = torch's choice)")


def demo(args: argparse.Namespace) -> int:
    from lungcore.train.demo import run_demo
    from lungcore.usage import UsageError, integer

    import torch

    try:  # before any work: torch.set_num_threads(-1) raises a RuntimeError, a negative seed fails in synth
        integer(args.threads, "--threads", 0, note=" (0: torch's choice)")
        integer(args.seed, "--seed", 0)
    except UsageError as exc:
        return _fail("demo", exc)
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
