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
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lungcore import usage
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
                     **{d: _chosen(op, d) for d in devices}}
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


def _chosen(op: str, device: str) -> str:
    """The backend ``op`` uses on ``device``, or ``"unavailable (...)"`` where a forced one cannot run."""
    from lungcore import backend

    try:
        return backend.backend_for(op, device)
    except backend.BackendUnavailable:
        return f"unavailable (LUNGCORE_BACKEND={backend.forced_backend()} cannot run on {device})"


def _import_all_ops() -> None:
    """Import every op module so that each registers its backends."""
    import importlib
    import pkgutil

    import lungcore.metrics  # noqa: F401
    import lungcore.ops as ops

    for mod in pkgutil.iter_modules(ops.__path__):
        importlib.import_module(f"lungcore.ops.{mod.name}")


def _cindex_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", type=Path, required=True, help="CSV with one row per subject (e.g. what predict writes)")
    p.add_argument("--risk", required=True, help="column of risk scores (higher = earlier event)")
    p.add_argument("--time", required=True, help="column of follow-up times (>= 0)")
    p.add_argument("--event", required=True, help="column of event indicators (1 event, 0 censored)")
    p.add_argument("--tau", type=float, default=None,
                   help="also report Uno's C truncated at tau (> 0, in the units of --time)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a row whose risk, time or event cell is empty (or NA/NaN) (default: leave such "
                        "rows out and say how many on stderr: predict leaves the cells of an endpoint a "
                        "patient lacks empty)")


# cells that mean "no value" (predict writes NaN as an empty cell; R and pandas write NA / NaN)
_MISSING = frozenset({"", "na", "n/a", "nan", "null"})


class _CsvError(ValueError):
    """A problem with the --csv data (exit 1)."""


def _cindex_column(frame, flag: str, column: str) -> tuple[Any, Any]:
    """(values as float64 with NaN where missing, missing mask) of ``column``; :class:`_CsvError`
    naming the flag, column and spreadsheet row (header = 1) of the first invalid cell."""
    import numpy as np

    cells = [str(c).strip() for c in frame[column]]
    missing = np.array([c.lower() in _MISSING for c in cells], dtype=bool)
    values = np.full(len(cells), np.nan)
    bad: list[tuple[int, str, str]] = []
    for i, cell in enumerate(cells):
        if missing[i]:
            continue
        if flag == "event" and cell.lower() in ("true", "false"):
            values[i] = float(cell.lower() == "true")
            continue
        try:
            v = float(cell)
        except ValueError:
            bad.append((i, cell, "is not a number"))
            continue
        if not np.isfinite(v):
            bad.append((i, cell, "is not finite"))
        elif flag == "time" and v < 0:
            bad.append((i, cell, "is negative: times must be >= 0"))
        elif flag == "event" and v not in (0.0, 1.0):
            bad.append((i, cell, "must be 0 (censored) or 1 (event)"))
        values[i] = v
    if bad:
        i, cell, why = bad[0]
        more = f" ({len(bad)} bad rows)" if len(bad) > 1 else ""
        raise _CsvError(f"--{flag} column {column!r}, row {i + 2}: {cell!r} {why}{more}")
    return values, missing


@subcommand("cindex", "Harrell's (and Uno's) C-index of a CSV column of risks", _cindex_args)
def _cindex(args: argparse.Namespace) -> int:
    import math

    import numpy as np
    import pandas as pd

    from lungcore.metrics import concordance_index, concordance_index_ipcw

    if args.csv.is_dir():
        return _usage("cindex", f"--csv {args.csv} is a folder; give the CSV file")
    if not args.csv.is_file():
        return _usage("cindex", f"--csv {args.csv}: no such file")
    if args.tau is not None and not (math.isfinite(args.tau) and args.tau > 0):
        return _usage("cindex", f"--tau must be a number > 0 (a time in the units of --time), got {args.tau:g}")
    try:  # every cell as text: the checks below name the row of a bad one
        frame = pd.read_csv(args.csv, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        return _failed("cindex", f"--csv {args.csv} is empty (no header row)")
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        return _failed("cindex", f"--csv {args.csv} is not a readable CSV: {str(exc).strip()}")
    for flag in ("risk", "time", "event"):
        column = getattr(args, flag)
        if column not in frame.columns:
            return _usage("cindex", f"--{flag} {column!r} is not a column of {args.csv} "
                                    f"(columns: {', '.join(map(str, frame.columns))})")
    try:
        parsed = {flag: _cindex_column(frame, flag, getattr(args, flag)) for flag in ("risk", "time", "event")}
    except _CsvError as exc:
        return _failed("cindex", f"{args.csv}: {exc}")
    # a blank line (every cell empty: a trailing newline too many) is no row, as in read_manifest
    blank = np.array([all(str(c).strip() == "" for c in row) for row in frame.itertuples(index=False)], dtype=bool)
    missing = np.zeros(len(frame), dtype=bool)
    for flag, (_, empty) in parsed.items():
        missing |= empty & ~blank
        empty &= ~blank
    if missing.any():
        per_column = ", ".join(f"{getattr(args, f)!r} {int(e.sum())}" for f, (_, e) in parsed.items() if e.any())
        if args.strict:
            flag = next(f for f, (_, e) in parsed.items() if e.any())
            row = int(np.flatnonzero(parsed[flag][1])[0]) + 2
            return _failed("cindex", f"{args.csv}: --{flag} column {getattr(args, flag)!r}, row {row} is empty "
                                     f"(--strict; empty cells per column: {per_column})")
        print(f"lungcore cindex: left out {int(missing.sum())} of {int((~blank).sum())} rows of {args.csv} with an empty "
              f"risk, time or event cell (empty cells per column: {per_column}); --strict refuses them",
              file=sys.stderr)
    keep = ~missing & ~blank
    risk, time, event = (parsed[f][0][keep] for f in ("risk", "time", "event"))
    if not keep.any():
        return _failed("cindex", f"{args.csv}: no row has a risk, a time and an event: nothing to score")
    c = concordance_index(risk, time, event, return_counts=True, no_pairs="nan")
    if math.isnan(c.cindex):
        return _failed("cindex", f"{args.csv}: no comparable pairs among the {int(keep.sum())} rows scored "
                                 f"({int(event.sum())} events): the C-index is undefined (every subject "
                                 f"censored, or all events at one time with nothing later)")
    out: dict[str, Any] = c.as_dict()
    out["rows"], out["rows_left_out"] = int(keep.sum()), int(missing.sum())
    if args.tau is not None:
        if not event[time < args.tau].any():
            return _failed("cindex", f"{args.csv}: no event before --tau {args.tau:g} (the first event is at "
                                     f"{time[event.astype(bool)].min():g}): Uno's C-index is undefined; "
                                     f"choose a larger --tau")
        try:
            uno = concordance_index_ipcw(risk, time, event, tau=args.tau, no_pairs="nan")
        except ValueError as exc:
            return _failed("cindex", f"{args.csv}: Uno's C-index at --tau {args.tau:g}: {exc}")
        if math.isnan(uno):
            return _failed("cindex", f"{args.csv}: no comparable pairs before --tau {args.tau:g}: Uno's C-index "
                                     f"is undefined; choose a larger --tau")
        out["uno_cindex"] = uno
    print(json.dumps(out, indent=1))
    return 0


def _usage(command: str, message: str) -> int:
    """A usage error: one line on stderr, exit code 2 (see :mod:`lungcore.usage`)."""
    print(f"lungcore {command}: {message}", file=sys.stderr)
    return 2


def _failed(command: str, message: str) -> int:
    """The data failed: one line on stderr, exit code 1."""
    print(f"lungcore {command}: {message}", file=sys.stderr)
    return 1


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


lazy_subcommand("validate", "check a cohort manifest: report every problem (row, column, value), exit 1 if any; "
                "warn of clinical values far outside the cohort", "lungcore.data.commands")
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
    if not getattr(args, "_run", None):  # bare ``lungcore``: a usage error (exit 2); ``--help`` exits 0
        parser.print_usage(sys.stderr)
        print(f"lungcore: error: a command is required: one of {', '.join(sorted(SUBCOMMANDS))} "
              "(lungcore --help describes them)", file=sys.stderr)
        return 2
    from lungcore import backend

    try:
        backend.forced_backend()  # an unknown LUNGCORE_BACKEND is a usage error before any work
    except ValueError as exc:
        return _usage(args.command, str(exc))
    try:
        with usage.command_line():  # usage errors name the flags, not the Python arguments
            return int(args._run(args) or 0)
    except backend.BackendUnavailable as exc:
        return _usage(args.command, f"{exc} (unset LUNGCORE_BACKEND, or set it to auto)")
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        resume = (f"; `lungcore train ... --out {out} --resume` continues from the last saved epoch"
                  if args.command == "train" and out else "")
        print(f"\nlungcore {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`lungcore cindex ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
