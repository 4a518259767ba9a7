"""Preprocessing settings (target spacing, crop, HU window, interpolation order) and the canonical
axial reorientation applied before resampling.

Example:
    >>> s = PreprocessSettings.cmml()
    >>> s.spacing, s.crop, PreprocessSettings.from_dict(s.to_dict()) == s
    ((2.0, 1.0, 1.0), (32, 128, 128), True)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lungcore.data.io import CTImage

MAX_CROP_VOXELS = 2 ** 30  # 1024^3: 4 GiB per crop in float32; a larger one is a typo

@dataclass(frozen=True)
class PreprocessSettings:
    """Target grid and crop. ``spacing`` (sz, sy, sx) mm; ``crop`` (D, H, W) output voxels;
    ``window`` (low, high) HU mapped to [0, 1]; ``order`` 0 nearest / 1 trilinear / 3 cubic; ``fill`` HU
    outside the scan; ``canonical`` reorients to the canonical axial frame first. A single number
    for ``spacing`` or ``crop`` means the same along each axis; invalid values raise ``ValueError``.

    Example:
        >>> s = PreprocessSettings(spacing=1.5, crop=(8, 32, 32))
        >>> s.spacing, s.crop, s.window, s.order
        ((1.5, 1.5, 1.5), (8, 32, 32), (-1200.0, 600.0), 1)
        >>> PreprocessSettings.for_kind("csfnet") == PreprocessSettings.csfnet()
        True
        >>> PreprocessSettings(window=(600, -1200))
        Traceback (most recent call last):
        ...
        ValueError: window must be finite (low, high) HU with low < high, got (600, -1200)
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop: tuple[int, int, int] = (16, 64, 64)
    window: tuple[float, float] = (-1200.0, 600.0)
    order: int = 1
    fill: float = -1024.0
    canonical: bool = True

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in (self.spacing if np.ndim(self.spacing) else (self.spacing,) * 3))
        crop = tuple(int(c) for c in (self.crop if np.ndim(self.crop) else (self.crop,) * 3))
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (sz, sy, sx) in mm, got {self.spacing!r}")
        if len(crop) != 3 or min(crop) < 1:
            raise ValueError(f"crop must be 3 positive integers (D, H, W), got {self.crop!r}")
        if math.prod(crop) > MAX_CROP_VOXELS:
            raise ValueError(f"crop {crop} holds {math.prod(crop):,} voxels, more than {MAX_CROP_VOXELS:,} "
                             "(4 GiB in float32) per crop")
        window = tuple(float(w) for w in self.window)
        if len(window) != 2 or not all(map(math.isfinite, window)) or not window[0] < window[1]:
            raise ValueError(f"window must be finite (low, high) HU with low < high, got {self.window!r}")
        if self.order not in (0, 1, 3):
            raise ValueError(f"order must be 0 (nearest), 1 (trilinear) or 3 (cubic B-spline), got {self.order!r}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "fill", float(self.fill))

    @classmethod
    def csfnet(cls) -> PreprocessSettings:
        """CSF-Net: 1 mm isotropic, lung window [-1200, 600] HU, 16 x 64 x 64 around the nodule."""
        return cls(spacing=(1.0, 1.0, 1.0), crop=(16, 64, 64), window=(-1200.0, 600.0))

    @classmethod
    def cmml(cls) -> PreprocessSettings:
        """CMML (our choice; the paper is silent): 2 x 1 x 1 mm, window [-1000, 400] HU,
        32 x 128 x 128 around the tumour."""
        return cls(spacing=(2.0, 1.0, 1.0), crop=(32, 128, 128), window=(-1000.0, 400.0))

    @classmethod
    def for_kind(cls, kind: str) -> PreprocessSettings:
        """The network's settings for a cohort ``kind``: :meth:`csfnet` for nodules, else :meth:`cmml`."""
        from lungcore.data.schema import canonical_kind

        return cls.csfnet() if canonical_kind(kind) == "nodules" else cls.cmml()

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples as lists): what a checkpoint stores."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSettings:
        """Settings from :meth:`to_dict`'s form (lists back to tuples), checked as the constructor checks them."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def canonical_orientation(image: CTImage) -> CTImage:
    """``image`` with array axes permuted/flipped so that depth, height and width run along world
    +z (superior), +y (posterior) and +x (left) as closely as the scan allows. No resampling: the
    array is a strided view and the affine follows it. Obliquely tilted scans keep their tilt.

    Example:
        >>> from lungcore.data.io import CTImage
        >>> affine = np.array([[-0.5, 0, 0, 10],   # array axis 0 runs towards the patient's right (-x)
        ...                    [0, -0.5, 0, 20],   # axis 1 towards the front (-y)
        ...                    [0, 0, 2.0, -30],   # axis 2 towards the head (+z)
        ...                    [0, 0, 0, 1]])
        >>> image = CTImage(np.arange(24.0).reshape(4, 3, 2), affine)   # stored (x, y, z), as in a NIfTI file
        >>> out = canonical_orientation(image)
        >>> out.shape, out.spacing
        ((2, 3, 4), (2.0, 0.5, 0.5))
        >>> np.sign(out.affine[:3, :3]).astype(int).tolist()   # depth -> +z, height -> +y, width -> +x
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
        >>> out.index_to_world([1, 0, 0]).tolist(), image.index_to_world([3, 2, 1]).tolist()   # one voxel
        ([8.5, 19.0, -28.0], [8.5, 19.0, -28.0])
        >>> float(out.array[1, 0, 0]), float(image.array[3, 2, 1]), np.shares_memory(out.array, image.array)
        (23.0, 23.0, True)
    """
    a = image.affine
    world_of_axis = np.argmax(np.abs(a[:3, :3]), axis=0)  # dominant world axis of each array axis
    if sorted(world_of_axis.tolist()) != [0, 1, 2]:
        return image
    perm = [int(np.flatnonzero(world_of_axis == w)[0]) for w in (2, 1, 0)]
    array = image.array.transpose(perm)
    affine = a.copy()
    affine[:, :3] = a[:, perm]
    flips = []
    for k in range(3):
        if affine[2 - k, k] < 0:
            flips.append(k)
            affine[:3, 3] += affine[:3, k] * (array.shape[k] - 1)
            affine[:3, k] *= -1
    if flips:
        array = np.flip(array, axis=flips)
    return CTImage(array=array, affine=affine)
