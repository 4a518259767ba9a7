"""Writing a synthetic cohort: CT files (NIfTI or DICOM series), CSV tables, number format, progress."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lungcore.data.io import write_dicom_series, write_nifti


def blank(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.uniform() < p)


def fmt(x: float) -> str:
    return f"{x:.4f}".rstrip("0").rstrip(".")


def write_ct(out: Path, name: str, vol: np.ndarray, affine: np.ndarray, dicom: bool, seed: int, i: int) -> str:
    if dicom:
        from pydicom.uid import generate_uid

        rel = f"images/{name}_dicom"
        write_dicom_series(out / rel, vol, affine, patient_id=name,
                           series_uid=generate_uid(entropy_srcs=[str(seed), name, "series"]),
                           study_uid=generate_uid(entropy_srcs=[str(seed), name, "study"]))
    else:
        rel = f"images/{name}.nii.gz"
        write_nifti(out / rel, vol, affine)
    return rel


def write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def progress(verbose: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not verbose, unit="CT")
