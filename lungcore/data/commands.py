"""The ``lungcore validate``, ``lungcore synth`` and ``lungcore preprocess`` commands (wired in cli.py).

Example:
    $ lungcore synth --kind nodules --n 20 --out cohort/ --preset tiny
    $ lungcore validate --manifest cohort/manifest.csv --workers 8
    $ lungcore preprocess --manifest cohort/manifest.csv --out cache/ --shard 0/2 --workers 8 --keep-going
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lungcore.data.manifest import Manifest, ManifestProblem


def validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, required=True, help="cohort manifest (CSV)")
    p.add_argument("--schema", type=Path, default=None,
                   help="schema (JSON/YAML); default: <manifest stem>.schema.json beside the manifest")
    p.add_argument("--images", choices=("exists", "header", "full"), default="full",
                   help="how hard to check image cells (default: full = read every image, as train does)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: a bar with --images full)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes reading the images of --images full (default: the cores available, as "
                        "preprocess)")


def validate(args: argparse.Namespace) -> int:
    from lungcore import usage
    from lungcore.data.manifest import check_manifest
    from lungcore.data.preprocess.pool import default_workers

    try:
        if args.workers is not None:
            usage.integer(args.workers, "--workers", 1)
    except usage.UsageError as exc:
        print(f"lungcore validate: {exc}", file=sys.stderr)
        return 2
    try:
        manifest, problems = check_manifest(args.manifest, args.schema, images=args.images,
                                            progress=args.images == "full" and not args.quiet,
                                            workers=args.workers or default_workers())
    except (FileNotFoundError, ValueError) as exc:
        print(f"lungcore validate: {exc}", file=sys.stderr)
        return 2
    if problems:  # the problems are the answer, but problems go to stderr (as every command's)
        print(f"{args.manifest}: {len(problems)} problem{'s' if len(problems) != 1 else ''}", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
    warnings = _warn_far_out(args.manifest, manifest) if manifest is not None else []
    if problems:
        return 1
    assert manifest is not None
    s = manifest.schema
    images = sum(p is not None for row in manifest.images for p in row)
    noted = f"; {len(warnings)} warning{'s' if len(warnings) != 1 else ''} (stderr)" if warnings else ""
    print(f"{args.manifest}: OK, {len(manifest)} rows ({len(set(manifest.patient_ids))} patients), "
          f"{images} images, kind {s.kind}, {len(s.clinical)} clinical variables, centres in {s.centre_frame} frame"
          f"{noted}")
    return 0


def _warn_far_out(path: Path, manifest: Manifest) -> list[ManifestProblem]:
    """Warn on stderr (``lungcore validate: WARNING: ...``, as predict and train warn) of the numeric
    clinical values far outside their column (``Manifest.far_out_values``): valid, so the exit
    status stays, but such a value can make the network's output NaN, and training then stops at
    its first validation epoch naming the row."""
    from lungcore.data.outliers import FAR_OUT_SD

    warnings = manifest.far_out_values()
    if warnings:
        n = len(warnings)
        print(f"lungcore validate: WARNING: {n} clinical value{'s' if n != 1 else ''} of {path} "
              f"{'lie' if n != 1 else 'lies'} more than {FAR_OUT_SD:g} standard deviations (robust: median and "
              "1.4826 x MAD of the column) from the rest of the cohort; a value this far out (a typo, another "
              "unit?) can make the network's output NaN, and training stops at such a row:", file=sys.stderr)
        for w in warnings:
            print(f"  {w}", file=sys.stderr)
    return warnings


def synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", required=True, choices=("survival", "nodules", "cmml", "csfnet"),
                   help="survival (CMML: one CT per patient, PFS/OS) or nodules (CSF-Net: T0/T1 CTs, label)")
    p.add_argument("--n", type=int, required=True, help="patients (survival) or nodules (nodules)")
    p.add_argument("--out", type=Path, required=True, help="output folder (manifest.csv, schema, images/)")
    p.add_argument("--preset", choices=("tiny", "fine", "demo", "realistic"), default="tiny",
                   help="volume (slices x rows x columns) at a nominal spacing: tiny 24x48x48 at 4x3x3 mm, fine "
                        "48x128x128 at 2x1x1 mm, demo 64x128x128 at 2.5x1.8x1.8 mm, realistic 300x512x512 at "
                        "1x0.7x0.7 mm; each patient's scan varies it as clinical scans do: slices 1 or 1.25 times "
                        "as thick, in-plane spacing within +-10%% (tiny: 4 or 5 mm by 2.7-3.3 mm; truth.csv "
                        "holds each scan's) (default: tiny)")
    p.add_argument("--effects", choices=("linear", "morphology", "interaction"), default="linear",
                   help="what sets the imaging part of the risk: linear (tumour size and texture), morphology "
                        "(margin, solid core, cavity, pleural contact, an interaction; what a linear model on "
                        "size/density features misses) or interaction (the linear images; the clinical record "
                        "scales their effect: what adding image and clinical evidence misses) (default: linear)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort (default: 0)")
    p.add_argument("--dicom-every", type=int, default=4, help="every k-th CT as a DICOM series (0: none; nodules: the follow-up "
                        "scan of every k-th patient; default: 4)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cohort in --out (its manifest, schema, truth and images/ are deleted first; "
                        "default: refuse a non-empty --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: bar on)")


SYNTH_OUTPUTS = ("images", "manifest.csv", "manifest.schema.json", "truth.csv", "synth.json")


def synth(args: argparse.Namespace) -> int:
    import shutil

    from lungcore import usage
    from lungcore.data.synth import synth_cohort
    from lungcore.usage import UsageError, out_folder

    try:
        usage.integer(args.n, "--n", 1)
        usage.integer(args.seed, "--seed", 0)
        usage.integer(args.dicom_every, "--dicom-every", 0)
        out_folder(args.out, "--out", overwrite=args.overwrite)
    except UsageError as exc:
        print(f"lungcore synth: {exc}", file=sys.stderr)
        return 2
    created = args.out  # the topmost folder this run creates (removed again if the run fails)
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    created = None if created.exists() else created
    try:  # --out /proc/x passes the permission check but cannot be created: say so before any work
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"lungcore synth: --out {args.out}: cannot create the folder ({exc.strerror or exc})", file=sys.stderr)
        return 2

    def remove_outputs() -> None:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
            return
        for name in SYNTH_OUTPUTS:  # --overwrite: no image of the old cohort stays mixed in
            old = args.out / name
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            elif old.exists() or old.is_symlink():
                old.unlink()

    if created is None:
        remove_outputs()
    try:
        info = synth_cohort(args.kind, args.out, args.n, preset=args.preset, seed=args.seed,
                            dicom_every=args.dicom_every, verbose=not args.quiet, effects=args.effects)
    except BaseException as exc:  # nothing half-written stays behind (a full disk, Ctrl-C, a bug)
        remove_outputs()
        if not isinstance(exc, OSError):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"lungcore synth: --out {args.out}: cannot write the cohort: {exc.strerror or exc}{where}; "
              "nothing was kept", file=sys.stderr)
        return 1
    print(f"wrote {info['n']} {info['kind']} rows to {info['manifest']} (schema {info['schema'].name}); "
          f"oracle {_oracle_text(info)}")
    return 0


def _oracle_text(info: dict) -> str:
    """The oracle metrics of a synthetic cohort; ``n/a`` (with the reason) where one is undefined."""
    import math

    names = ("os_cindex", "pfs_cindex") if info["kind"] == "survival" else ("auc",)
    values = {k: info["oracle"].get(k) for k in (*names, *info["oracle"])}
    text = ", ".join(f"{k} {v:.3f}" if v is not None and math.isfinite(v) else f"{k} n/a" for k, v in values.items())
    if "n/a" in text:
        text += (" (undefined: needs at least 2 patients and an event before a later follow-up)"
                 if info["kind"] == "survival" else " (undefined: needs a benign and a malignant nodule)")
    return text


def preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, required=True, help="cohort manifest (CSV)")
    p.add_argument("--out", type=Path, required=True, help="cache folder (shared by all shards)")
    p.add_argument("--schema", type=Path, default=None, help="schema; default: beside the manifest")
    p.add_argument("--preset", choices=("auto", "cmml", "csfnet"), default="auto",
                   help="preprocessing settings (auto: from the schema's kind)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SZ", "SY", "SX"),
                   help="target voxel spacing in mm, > 0 (default: the preset's)")
    p.add_argument("--crop", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="crop size in voxels, >= 1 (default: the preset's)")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="HU window mapped to [0, 1], LOW < HIGH (default: the preset's)")
    p.add_argument("--shard", default=None, help="i/n: this process's share (default: torchrun RANK/WORLD_SIZE)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to resample (default: auto = cuda if available)")
    p.add_argument("--verify", choices=("stat", "content"), default="stat",
                   help="how the cache recognises a source image: stat (size + modification time) or content "
                        "(hash every file: catches a rewrite with the same size and time; default: stat)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: one line)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: bar on)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes on this machine (default: the cores available, divided among torchrun's "
                        "local processes); composes with --shard: each shard's images are spread over them")
    p.add_argument("--keep-going", action="store_true",
                   help="a CT that fails is named by its manifest row in the report and the others are still "
                        "done (exit status 1); default: stop at the first failure")


def preprocess(args: argparse.Namespace) -> int:
    import dataclasses

    from lungcore import usage
    from lungcore.data.manifest import ManifestError, read_manifest
    from lungcore.data.preprocess import (PreprocessSettings, Preprocessor, default_workers, preprocess_manifest,
                                          shard_from_env)
    from lungcore.data.preprocess.settings import MAX_CROP_VOXELS

    try:  # every argument is checked before the first image is read
        usage.positive(args.spacing, "--spacing")
        usage.positive(args.crop, "--crop", integer=True)
        if args.crop is not None and math.prod(args.crop) > MAX_CROP_VOXELS:
            raise usage.UsageError(f"--crop {' '.join(map(str, args.crop))}: {math.prod(args.crop):,} voxels per crop, "
                                   f"more than {MAX_CROP_VOXELS:,} (4 GiB in float32)")
        if args.window is not None:
            low, high = args.window
            if not (math.isfinite(low) and math.isfinite(high)):
                raise usage.UsageError(f"--window {low:g} {high:g}: LOW and HIGH must be finite HU")
            if not low < high:
                raise usage.UsageError(f"--window {low:g} {high:g}: LOW must be below HIGH")
        if args.workers is not None:
            usage.integer(args.workers, "--workers", 1)
        usage.device(args.device)
        usage.out_folder(args.out, "--out", overwrite=True)  # a cache is shared: only writability matters
        shard = shard_from_env(args.shard)
    except ValueError as exc:
        print(f"lungcore preprocess: {exc}", file=sys.stderr)
        return 2
    try:
        manifest = read_manifest(args.manifest, args.schema, images="exists")
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"lungcore preprocess: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, ManifestError) else 2
    settings = (PreprocessSettings.for_kind(manifest.schema.kind) if args.preset == "auto"
                else getattr(PreprocessSettings, args.preset)())
    changes = {k: tuple(v) for k, v in (("spacing", args.spacing), ("crop", args.crop), ("window", args.window))
               if v is not None}
    settings = dataclasses.replace(settings, **changes)
    pre = Preprocessor(settings, cache_dir=args.out, device=args.device, verify=args.verify)
    try:
        report = preprocess_manifest(manifest, pre, shard=shard, progress=not args.quiet,
                                     workers=args.workers or default_workers(), keep_going=args.keep_going)
    except (ValueError, RuntimeError) as exc:
        from lungcore.backend import BackendUnavailable

        if isinstance(exc, BackendUnavailable):
            raise  # the command line's one line for it (exit 2)
        print(f"lungcore preprocess: {exc}", file=sys.stderr)
        return 1
    report["settings"] = settings.to_dict()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"report-{shard[0]}-of-{shard[1]}.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        busy = report["read_s"] + report["resample_s"] + report["hash_s"] + report["cache_io_s"]
        split = ", ".join(f"{k[:-2]} {report[k]:.2f} s ({100 * report[k] / busy:.0f}%)" if busy else f"{k[:-2]} 0 s"
                          for k in ("read_s", "resample_s", "hash_s", "cache_io_s"))
        print(f"shard {report['shard']}: {report['images']} CTs, {report['boxes']} crops in {report['seconds']:.2f} s "
              f"= {report['volumes_per_s']} volumes/s with {report['workers']} worker"
              f"{'s' if report['workers'] != 1 else ''}"
              f"{' (every crop had a cache entry: no worker pool)' if report['all_cached'] else ''}"
              f"; cache {report['hits']} hits, {report['misses']} misses, "
              f"{report['rebuilt']} rebuilt; time (summed over workers): {split}")
    for f in report["failed"]:
        print(f"lungcore preprocess: failed: row {f['row']}, column {f['column']!r}, value {f['path']!r}: {f['error']}",
              file=sys.stderr)
    if report["failed"]:
        print(f"lungcore preprocess: {len(report['failed'])} of {report['images']} CTs failed (listed in "
              f"{args.out / f'report-{shard[0]}-of-{shard[1]}.json'})", file=sys.stderr)
        return 1
    return 0
