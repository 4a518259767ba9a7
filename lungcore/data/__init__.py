"""lungcore.data: cohort manifests, CT readers, cached preprocessing, datasets, synthetic cohorts.

Example:
    >>> import tempfile
    >>> from lungcore.data import synth_cohort, read_manifest, split_by_patient
    >>> info = synth_cohort("nodules", tempfile.mkdtemp(), n=4, preset="tiny")
    >>> m = read_manifest(info["manifest"])
    >>> sorted(split_by_patient(m))
    ['test', 'train', 'val']
"""
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
