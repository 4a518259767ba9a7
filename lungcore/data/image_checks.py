"""The image checks of a manifest's cells, at the levels of ``IMAGE_CHECKS``: does the file exist,
does its header parse, does the whole image read; and does a centre lie inside the image.
``lungcore.data.manifest`` runs them per distinct image (``check_all_full``: the ``"full"`` level in
``lungcore preprocess``'s pool of processes); ``lungcore.train.preflight`` reuses them for the
images a training run reads.

Example:
    >>> import numpy as np
    >>> check_image(__import__("pathlib").Path("/no/such.nii.gz"), "exists")
    (('file not found', ''), None)
    >>> centre_outside(np.array([1.0, 1.0, 9.0]), "voxel", ((4, 4, 4), np.eye(4)))[:29]
    'centre lies outside the image'
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

IMAGE_CHECKS = ("none", "exists", "header", "full")


def check_image(path: Path, level: str) -> tuple[tuple[str, str] | None, tuple[tuple[int, ...], np.ndarray] | None]:
    """(None if fine else (message, detail), (shape, affine) when the check learnt them)."""
    if level == "none":
        return None, None
    if not path.exists():
        return ("file not found", ""), None
    if level == "exists":
        return None, None
    from lungcore.data.io import read_ct, read_ct_header

    try:
        if level == "full":
            ct = read_ct(path, dtype=None, contiguous=False)
            return None, (ct.shape, ct.affine)
        shape, affine = read_ct_header(path)
        return None, None if affine is None else (shape, affine)
    except Exception as exc:  # noqa: BLE001 - any reader failure is an unreadable image
        return ("unreadable image (not a NIfTI file or DICOM series lungcore can read)",
                f"{type(exc).__name__}: {exc}"), None


def full_check(path: str) -> tuple[tuple[str, str] | None, tuple[tuple[int, ...], np.ndarray] | None]:
    """:func:`check_image` at ``"full"``, as a pool task (module level: the worker processes import it)."""
    return check_image(Path(path), "full")


def source_index(centre_xyz: np.ndarray, frame: str, affine: np.ndarray) -> np.ndarray:
    """A manifest centre (x, y, z: voxel indices or LPS millimetres, per ``frame``) as a (z, y, x)
    voxel index of the image as stored (``affine``: its index -> LPS mm map): the index every
    "lies outside the image" message reports, from ``validate`` and from ``preprocess`` alike.

    Example:
        >>> axial = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])  # 2 x 1 x 1 mm
        >>> source_index(np.array([10.0, 20.0, 30.0]), "world", axial).tolist()
        [15.0, 20.0, 10.0]
    """
    centre_xyz = np.asarray(centre_xyz, dtype=np.float64)
    if frame == "voxel":
        return centre_xyz[::-1]
    inv = np.linalg.inv(affine)
    return inv[:3, :3] @ centre_xyz + inv[:3, 3]


def centre_outside(centre_xyz: np.ndarray, frame: str, geometry: tuple[tuple[int, ...], np.ndarray]) -> str | None:
    """Why a centre (x, y, z: voxel indices or LPS millimetres, per ``frame``) lies outside an image of
    ``geometry`` (shape, affine), or None when it lies inside."""
    shape, affine = geometry
    idx = source_index(centre_xyz, frame, affine)
    n = np.asarray(shape, dtype=np.float64)
    if np.all(idx >= -0.5) and np.all(idx <= n - 0.5):
        return None
    hint = " (are the coordinates LPS millimetres? RAS flips the signs of x and y)" if frame == "world" else ""
    return (f"centre lies outside the image: voxel index (z, y, x) {np.round(idx, 1).tolist()}, "
            f"image shape {tuple(int(v) for v in shape)}{hint}")


def check_all_full(paths: list[Path], workers: int, progress: bool) -> dict[Path, Any]:
    """The ``"full"`` check of every image in ``paths``, read by a pool of ``workers`` processes."""
    from tqdm import tqdm

    from lungcore.data.preprocess.pool import READ_PRELOAD, map_images

    checked: dict[Path, Any] = {}
    if not paths:
        return checked
    with tqdm(total=len(paths), desc="read images", unit="CT", disable=not progress, leave=False) as bar:
        def done(p: Path, result: Any) -> None:
            checked[p] = result
            bar.update()

        map_images(full_check, paths, lambda p: (), min(workers, len(paths)), done,
                   preload=("lungcore.data.image_checks", *READ_PRELOAD))
    return checked
