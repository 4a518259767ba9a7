"""Synthetic chest-CT cohorts written to disk (NIfTI + DICOM series + manifest + schema).

No public CT cohort is reachable here, so these generators exercise the *real* path: image files
on disk read back through MONAI, a manifest validated at load, world-coordinate centres converted
with each scan's affine. Each volume is a chest phantom: air (-1024 HU) outside an elliptic body of
soft tissue (~40 HU) with a fat rim (~-100 HU), two lungs (~-850 HU) with branching vessels (~40 HU),
a spine (~400 HU), Gaussian noise, clinical spacing that varies between patients, and an affine
with a table offset (and, for some patients, slices stored from head to feet). The signal:

- ``survival`` (CMML shape): a tumour whose volume and texture, with age, ECOG, stage and PD-L1,
  set a log-hazard ``eta``; PFS and OS times come from Weibull proportional-hazards models with
  administrative and random censoring, so the oracle C-index (of ``eta``) is known. The clinical
  variables depend on each other and on the tumour (stage on its size, PD-L1 on its texture, ECOG
  on age, smoking on sex and age; see ``_survival_patient``), so a masked one can be completed.
- ``nodules`` (CSF-Net shape): a nodule at T0 and T1 (a rescan months later, patient shifted on
  the table); malignant-leaning nodules are larger, grow between the scans, and current smokers,
  older patients, women, positive screens and isolated nodules carry more risk; the label is drawn
  from a known logistic model (oracle AUC known).
  Several nodules may belong to one patient: they sit in the same T0 and T1 scans.

With ``effects="morphology"`` the imaging part of the risk depends instead on what a radiologist
reads and size/density summaries miss: the lesion's margin (smooth, lobulated, spiculated), the
solid fraction of a part-solid lesion, a cavity, contact with the pleura and (survival) a size x
texture interaction, (nodules) a growing solid component and new spiculation between T0 and T1
(``lesions.py``, ``survival.py``, ``nodules.py`` state every effect and its size). With
``effects="interaction"`` the images and clinical records are the linear cohort's, and the
clinical record scales the image effects (survival: tumour size matters in PD-L1-low patients;
nodules: growth in current smokers, size after a positive screen), which a model adding image
and clinical evidence misses.

Modules: ``phantom`` (anatomy, the linear lesion, geometry, presets), ``lesions`` (the morphology
lesion, handcrafted features), ``survival`` and ``nodules`` (the two cohorts), ``writing`` (files),
``cohort`` (``synth_cohort``).

Some patients have missing clinical values, a missing endpoint or (survival) no CT; every fourth
patient's CT is a DICOM series (uint16, RescaleIntercept -1024) instead of a NIfTI file. Output is
deterministic for a seed. ``truth.csv`` beside the manifest holds the planted ground truth
(lesion centre in voxel indices, diameters, the linear predictor).

Example:
    >>> import tempfile
    >>> from lungcore.data.synth import synth_cohort
    >>> info = synth_cohort("nodules", tempfile.mkdtemp(), n=4, preset="tiny", seed=0)
    >>> info["manifest"].name, info["n"]
    ('manifest.csv', 4)
"""
from lungcore.data.synth.cohort import GENERATOR_VERSION, synth_cohort
from lungcore.data.synth.lesions import FEATURES, Lesion, lesion_features
from lungcore.data.synth.nodules import nodules_schema
from lungcore.data.synth.phantom import EFFECTS, PRESETS, Preset, chest_phantom
from lungcore.data.synth.survival import survival_schema

__all__ = ["EFFECTS", "FEATURES", "GENERATOR_VERSION", "Lesion", "PRESETS", "Preset", "chest_phantom",
           "lesion_features", "nodules_schema", "survival_schema", "synth_cohort"]
