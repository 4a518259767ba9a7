"""What a training run writes besides checkpoints: ``train.log`` (and the console), loud warnings,
``metrics.csv``, and the cleanup of a previous run that ``--overwrite`` replaces.

Every writer acts on the main rank only (under torchrun the other ranks return).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp())
    >>> write_metrics_csv(out, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4, "val_loss": 0.6}])
    >>> (out / "metrics.csv").read_text().splitlines()
    ['epoch,loss,val_loss', '1,0.5,', '2,0.4,0.6']
"""
from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lungcore.train import distributed as dist_utils

RUN_OUTPUTS = ("config.yaml", "splits.json", "last.pt", "best.pt", "metrics.csv", "train.log",
               "predictions_test.csv", "report", "tensorboard")


def log(out: Path, message: str, echo: bool = True) -> None:
    """Append a time-stamped line to ``out/train.log`` (and print it when ``echo``)."""
    if not dist_utils.is_main():
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(out / "train.log", "a") as f:
        f.write(f"{stamp} {message}\n")
        f.flush()
    if echo:
        print(message, flush=True)


def warn(out: Path, message: str) -> None:
    """A loud warning: stderr and train.log (the report repeats it)."""
    if not dist_utils.is_main():
        return
    log(out, f"WARNING: {message}", echo=False)
    print(f"lungcore train: WARNING: {message}", file=sys.stderr, flush=True)


def remove_previous_run(out: Path) -> None:
    """--overwrite: delete what a previous run wrote in ``out`` (its cache/ and other files stay)."""
    for p in out.iterdir() if out.is_dir() else ():
        if p.name in RUN_OUTPUTS or (p.name.startswith("best_") and p.suffix == ".pt"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def write_metrics_csv(out: Path, history: list[dict[str, Any]]) -> None:
    """``out/metrics.csv``, one row per epoch (columns in order of first appearance), written atomically."""
    if not dist_utils.is_main():
        return
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(history)
    tmp.replace(out / "metrics.csv")
