"""The ``lungcore`` command (also ``python -m lungcore``).

Subcommands register themselves in :data:`SUBCOMMANDS` (name -> (help, add_arguments, run)),
so later pieces (train, evaluate, predict, validate, ...) add one entry each.

Example:
    $ lungcore --version
    $ lungcore info
    $ lungcore cindex --csv preds.csv --risk risk --time os_time --event os_event
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from lungcore._version import __version__

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
SUBCOMMANDS: dict[str, tuple[str, AddArguments, Run]] = {}


def subcommand(name: str, help: str, add_arguments: AddArguments) -> Callable[[Run], Run]:
    """Register a ``lungcore <name>`` subcommand (decorates its run function)."""
    def wrap(run: Run) -> Run:
        SUBCOMMANDS[name] = (help, add_arguments, run)
        return run
    return wrap


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


@subcommand("info", "versions, devices and the backend each op will use", _info_args)
def _info(args: argparse.Namespace) -> int:
    import torch

    import lungcore
    from lungcore import backend

    _import_all_ops()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "lungcore": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton_importable": backend.triton_importable(),
        "triton_interpret": backend.interpreting(),
        "cpp_extension": backend.cpp_available(),
        "cupy_device": backend.cupy_available(),
        "forced_backend": backend.forced_backend(),
        # per op, from the one registry: the backends it implements, then the one chosen per device
        "ops": {op: {"backends": [b for b in backend.BACKENDS if b in info.backends],
                     **{d: backend.backend_for(op, d) for d in devices}}
                for op, info in sorted(backend.registered_ops().items())},
    }
    if backend.cpp_available():
        from lungcore import _C

        report["openmp_threads"] = _C.openmp_threads()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"lungcore {lungcore.__version__}  python {report['python']}  torch {report['torch']}")
    for key in ("cuda_available", "cuda_device", "triton_importable", "triton_interpret", "cpp_extension",
                "openmp_threads", "cupy_device", "forced_backend"):
        if key in report:
            print(f"  {key:18s} {report[key]}")
    print(f"    {'op':26s} {'backends (implemented)':35s} chosen now")
    for op, entry in report["ops"].items():
        chosen = "  ".join(f"{d}: {entry[d]}" for d in devices)
        print(f"    {op:26s} {', '.join(entry['backends']):35s} {chosen}")
    return 0


def _import_all_ops() -> None:
    """Import every op module so that each registers its backends."""
    import importlib
    import pkgutil

    import lungcore.metrics  # noqa: F401
    import lungcore.ops as ops

    for mod in pkgutil.iter_modules(ops.__path__):
        importlib.import_module(f"lungcore.ops.{mod.name}")


def _cindex_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", type=Path, required=True, help="CSV with one row per subject")
    p.add_argument("--risk", required=True, help="column of risk scores (higher = earlier event)")
    p.add_argument("--time", required=True, help="column of follow-up times")
    p.add_argument("--event", required=True, help="column of event indicators (1 event, 0 censored)")
    p.add_argument("--tau", type=float, default=None, help="also report Uno's C truncated at tau")


@subcommand("cindex", "Harrell's (and Uno's) C-index of a CSV column of risks", _cindex_args)
def _cindex(args: argparse.Namespace) -> int:
    import pandas as pd

    from lungcore.metrics import concordance_index, concordance_index_ipcw

    if not args.csv.is_file():
        return _usage("cindex", f"--csv {args.csv}: no such file")
    frame = pd.read_csv(args.csv)
    for flag in ("risk", "time", "event"):
        column = getattr(args, flag)
        if column not in frame.columns:
            return _usage("cindex", f"--{flag} {column!r} is not a column of {args.csv} "
                                    f"(columns: {', '.join(map(str, frame.columns))})")
    try:
        c = concordance_index(frame[args.risk].to_numpy(), frame[args.time].to_numpy(),
                              frame[args.event].to_numpy(), return_counts=True)
        out = c.as_dict()
        if args.tau is not None:
            out["uno_cindex"] = concordance_index_ipcw(frame[args.risk].to_numpy(), frame[args.time].to_numpy(),
                                                       frame[args.event].to_numpy(), tau=args.tau)
    except ValueError as exc:
        print(f"lungcore cindex: {args.csv}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1))
    return 0


def _usage(command: str, message: str) -> int:
    """A usage error: one line on stderr, exit code 2 (see :mod:`lungcore.usage`)."""
    print(f"lungcore {command}: {message}", file=sys.stderr)
    return 2


def lazy_subcommand(name: str, help: str, module: str) -> None:
    """Register ``lungcore <name>`` whose ``<name>_args(parser)`` and ``<name>(args)`` live in
    ``module`` (imported only when the subcommand runs or its --help is built: keeps the
    ``lungcore`` command fast to start)."""
    import importlib

    def add(p: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module), f"{name}_args")(p)

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    subcommand(name, help, add)(run)


lazy_subcommand("validate", "check a cohort manifest: report every problem (row, column, value), exit 1 if any",
                "lungcore.data.commands")
lazy_subcommand("synth", "write a synthetic cohort (NIfTI + DICOM series + manifest + schema)",
                "lungcore.data.commands")
lazy_subcommand("preprocess", "resample, window and crop every CT of a manifest into the cache (shardable)",
                "lungcore.data.commands")
lazy_subcommand("train", "train a network on a cohort (checkpoints, --resume, torchrun/DDP, report)",
                "lungcore.train.commands")
lazy_subcommand("evaluate", "metrics + report of a checkpoint on a labelled manifest", "lungcore.train.commands")
lazy_subcommand("predict", "risks / malignancy probabilities of a checkpoint for every row of a manifest (CSV)",
                "lungcore.train.commands")
lazy_subcommand("demo", "the main job: synthetic cohorts, train CMML and CSF-Net, test metrics vs the oracle",
                "lungcore.train.commands")


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default: appends ``(default: X)`` unless the help text states it
    already or there is none to state (a flag that is off, an option without a default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False)
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungcore",
        description="GPU-first multimodal lung-CT deep learning (CMML survival, CSF-Net malignancy).",
    )
    parser.add_argument("--version", action="version", version=f"lungcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in sorted(SUBCOMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lungcore`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
