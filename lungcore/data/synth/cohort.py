"""``synth_cohort``: a synthetic cohort written to disk, reused when the same arguments wrote it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lungcore.data.schema import canonical_kind
from lungcore.data.synth.nodules import _synth_nodules
from lungcore.data.synth.phantom import EFFECTS, PRESETS
from lungcore.data.synth.survival import _synth_survival

GENERATOR_VERSION = 3  # bump when the same arguments would write a different cohort
# 3: pleural lesions (effects="morphology") lie whole inside the scan (2 put about 1 in 1,500 outside)


def synth_cohort(kind: str, out: str | Path, n: int, *, preset: str = "tiny", seed: int = 0,
                 dicom_every: int = 4, missing: float = 0.08, verbose: bool = False,
                 reuse: bool = False, effects: str = "linear") -> dict[str, Any]:
    """Write a synthetic cohort to ``out``: images, ``manifest.csv``, ``manifest.schema.json``, ``truth.csv``.

    ``kind``: ``survival`` (alias ``cmml``) or ``nodules`` (alias ``csfnet``); ``n`` patients
    (survival) or nodules (nodules); ``preset``: ``tiny``, ``fine``, ``demo`` or ``realistic``; every
    ``dicom_every``-th CT is a DICOM series (0: none); ``missing``: the probability of a blank
    clinical cell. ``reuse``: return the summary of a cohort already in ``out`` instead of
    writing it again when it was written with the same arguments by the same generator version
    (``synth.json`` says; anything else is rewritten). Returns a summary with the oracle metric
    (C-index of the true log-hazard for PFS and OS, or the AUC of the true logit) and ``reused``.
    ``effects``: ``linear`` (the cohorts of generator version 2, unchanged since), ``morphology``
    (lesion margins, solid cores, cavities, pleural contact and an interaction set the risk) or
    ``interaction`` (the linear cohort's images and records; the clinical record scales the image
    effects); see ``survival_patient`` and ``nodule_draw``. ``truth.csv`` also holds each lesion's handcrafted
    features on its true mask (``feat_*``, :func:`lungcore.data.synth.lesions.lesion_features`).

    Example:
        >>> import tempfile
        >>> info = synth_cohort("survival", tempfile.mkdtemp(), n=3, effects="morphology", dicom_every=0)
        >>> info["effects"], info["n"]
        ('morphology', 3)
    """
    kind = canonical_kind(kind)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if effects not in EFFECTS:
        raise ValueError(f"effects must be one of {EFFECTS}, got {effects!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    out = Path(out)
    wanted = {"kind": kind, "preset": preset, "seed": seed, "n": n, "dicom_every": dicom_every, "missing": missing,
              "generator_version": GENERATOR_VERSION, "effects": effects}
    if reuse and (out / "synth.json").is_file() and (out / "manifest.csv").is_file():
        try:
            saved = json.loads((out / "synth.json").read_text())
        except json.JSONDecodeError:
            saved = {}
        saved.setdefault("effects", "linear")  # written before the option existed
        if all(saved.get(k) == v for k, v in wanted.items()):
            return {**saved, "manifest": out / "manifest.csv", "schema": out / "manifest.schema.json", "reused": True}
    (out / "images").mkdir(parents=True, exist_ok=True)
    if kind == "survival":
        info = _synth_survival(out, n, PRESETS[preset], seed, dicom_every, missing, verbose, effects)
    else:
        info = _synth_nodules(out, n, PRESETS[preset], seed, dicom_every, missing, verbose, effects)
    info.update(wanted, manifest=out / "manifest.csv", schema=out / "manifest.schema.json")
    (out / "synth.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in info.items()},
                                               indent=1) + "\n")
    return {**info, "reused": False}
