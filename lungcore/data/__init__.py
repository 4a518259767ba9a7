"""lungcore.data: cohort manifests, CT readers, cached preprocessing, datasets, synthetic cohorts.

Example:
    >>> import tempfile
    >>> from lungcore.data import synth_cohort, read_manifest, split_by_patient
    >>> info = synth_cohort("nodules", tempfile.mkdtemp(), n=4, preset="tiny")
    >>> m = read_manifest(info["manifest"])
    >>> sorted(split_by_patient(m))
    ['test', 'train', 'val']
"""
from typing import TYPE_CHECKING

from lungcore._lazy import lazy_exports

if TYPE_CHECKING:
    from lungcore.data.dataset import Augmentation, CohortDataset, split_by_patient
    from lungcore.data.io import (READERS, CTImage, NativeReaderUnsupported, read_ct, read_ct_header,
                                  write_dicom_series, write_nifti)
    from lungcore.data.manifest import Manifest, ManifestError, ManifestProblem, check_manifest, read_manifest
    from lungcore.data.preprocess import (
        PreprocessSettings,
        PreprocessStats,
        Preprocessor,
        canonical_orientation,
        source_digest,
    )
    from lungcore.data.schema import ClinicalVariable, CohortSchema
    from lungcore.data.synth import PRESETS, synth_cohort

__all__ = [
    "Augmentation", "CohortDataset", "split_by_patient",
    "CTImage", "NativeReaderUnsupported", "READERS", "read_ct", "read_ct_header", "write_dicom_series",
    "write_nifti",
    "Manifest", "ManifestError", "ManifestProblem", "check_manifest", "read_manifest",
    "PreprocessSettings", "PreprocessStats", "Preprocessor", "canonical_orientation", "source_digest",
    "ClinicalVariable", "CohortSchema",
    "PRESETS", "synth_cohort",
]
# imported on first use: `lungcore synth` and `validate` start without importing torch
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["Augmentation", "CohortDataset", "split_by_patient"], "lungcore.data.dataset"),
    **dict.fromkeys(["CTImage", "NativeReaderUnsupported", "READERS", "read_ct", "read_ct_header",
                     "write_dicom_series", "write_nifti"], "lungcore.data.io"),
    **dict.fromkeys(["Manifest", "ManifestError", "ManifestProblem", "check_manifest", "read_manifest"],
                    "lungcore.data.manifest"),
    **dict.fromkeys(["PreprocessSettings", "PreprocessStats", "Preprocessor", "canonical_orientation",
                     "source_digest"], "lungcore.data.preprocess"),
    **dict.fromkeys(["ClinicalVariable", "CohortSchema"], "lungcore.data.schema"),
    **dict.fromkeys(["PRESETS", "synth_cohort"], "lungcore.data.synth"),
})
