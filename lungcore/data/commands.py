"""The ``lungcore validate``, ``lungcore synth`` and ``lungcore preprocess`` commands (wired in cli.py).

Example:
    $ lungcore synth --kind nodules --n 20 --out cohort/ --preset tiny
    $ lungcore validate --manifest cohort/manifest.csv
    $ lungcore preprocess --manifest cohort/manifest.csv --out cache/ --shard 0/2 --workers 8 --keep-going
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, required=True, help="cohort manifest (CSV)")
    p.add_argument("--schema", type=Path, default=None,
                   help="schema (JSON/YAML); default: <manifest stem>.schema.json beside the manifest")
    p.add_argument("--images", choices=("exists", "header", "full"), default="full",
                   help="how hard to check image cells (default: read every image fully)")


def validate(args: argparse.Namespace) -> int:
    from lungcore.data.manifest import check_manifest

    try:
        manifest, problems = check_manifest(args.manifest, args.schema, images=args.images)
    except (FileNotFoundError, ValueError) as exc:
        print(f"lungcore validate: {exc}", file=sys.stderr)
        return 2
    if problems:
        print(f"{args.manifest}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
        for p in problems:
            print(f"  {p}")
        return 1
    assert manifest is not None
    s = manifest.schema
    images = sum(p is not None for row in manifest.images for p in row)
    print(f"{args.manifest}: OK, {len(manifest)} rows ({len(set(manifest.patient_ids))} patients), "
          f"{images} images, kind {s.kind}, {len(s.clinical)} clinical variables, centres in {s.centre_frame} frame")
    return 0


def synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", required=True, choices=("survival", "nodules", "cmml", "csfnet"),
                   help="survival (CMML: one CT per patient, PFS/OS) or nodules (CSF-Net: T0/T1 CTs, label)")
    p.add_argument("--n", type=int, required=True, help="patients (survival) or nodules (nodules)")
    p.add_argument("--out", type=Path, required=True, help="output folder (manifest.csv, schema, images/)")
    p.add_argument("--preset", choices=("tiny", "demo", "realistic"), default="tiny", help="volume size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dicom-every", type=int, default=4, help="every k-th CT as a DICOM series (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def synth(args: argparse.Namespace) -> int:
    from lungcore.data.synth import synth_cohort

    if args.n < 1:
        print("lungcore synth: --n must be >= 1", file=sys.stderr)
        return 2
    info = synth_cohort(args.kind, args.out, args.n, preset=args.preset, seed=args.seed,
                        dicom_every=args.dicom_every, verbose=not args.quiet)
    oracle = ", ".join(f"{k} {v:.3f}" for k, v in info["oracle"].items())
    print(f"wrote {info['n']} {info['kind']} rows to {info['manifest']} (schema {info['schema'].name}); "
          f"oracle {oracle}")
    return 0


def preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, required=True, help="cohort manifest (CSV)")
    p.add_argument("--out", type=Path, required=True, help="cache folder (shared by all shards)")
    p.add_argument("--schema", type=Path, default=None, help="schema; default: beside the manifest")
    p.add_argument("--preset", choices=("auto", "cmml", "csfnet"), default="auto",
                   help="preprocessing settings (auto: from the schema's kind)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SZ", "SY", "SX"))
    p.add_argument("--crop", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    p.add_argument("--shard", default=None, help="i/n: this process's share (default: torchrun RANK/WORLD_SIZE)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None,
                   help="processes on this machine (default: the cores available, divided among torchrun's "
                        "local processes); composes with --shard: each shard's images are spread over them")
    p.add_argument("--keep-going", action="store_true",
                   help="a CT that fails is named by its manifest row in the report and the others are still "
                        "done (exit status 1); default: stop at the first failure")


def preprocess(args: argparse.Namespace) -> int:
    import dataclasses

    from lungcore.data.manifest import ManifestError, read_manifest
    from lungcore.data.preprocess import (PreprocessSettings, Preprocessor, default_workers, preprocess_manifest,
                                          shard_from_env)

    try:
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        manifest = read_manifest(args.manifest, args.schema, images="exists")
        shard = shard_from_env(args.shard)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"lungcore preprocess: {exc}", file=sys.stderr)
        return 2
    settings = (PreprocessSettings.for_kind(manifest.schema.kind) if args.preset == "auto"
                else getattr(PreprocessSettings, args.preset)())
    changes = {k: tuple(v) for k, v in (("spacing", args.spacing), ("crop", args.crop), ("window", args.window))
               if v is not None}
    settings = dataclasses.replace(settings, **changes)
    pre = Preprocessor(settings, cache_dir=args.out, device=args.device)
    try:
        report = preprocess_manifest(manifest, pre, shard=shard, progress=not args.quiet,
                                     workers=args.workers or default_workers(), keep_going=args.keep_going)
    except (ValueError, RuntimeError) as exc:
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
              f"{'s' if report['workers'] != 1 else ''}; cache {report['hits']} hits, {report['misses']} misses, "
              f"{report['rebuilt']} rebuilt; time (summed over workers): {split}")
    for f in report["failed"]:
        print(f"lungcore preprocess: failed: row {f['row']}, column {f['column']!r}, value {f['path']!r}: {f['error']}",
              file=sys.stderr)
    if report["failed"]:
        print(f"lungcore preprocess: {len(report['failed'])} of {report['images']} CTs failed (listed in "
              f"{args.out / f'report-{shard[0]}-of-{shard[1]}.json'})", file=sys.stderr)
        return 1
    return 0
