"""Preprocessing settings (target spacing, crop, HU window, interpolation order) and the canonical
axial reorientation applied before resampling.

Example:
    >>> s = PreprocessSettings.cmml()
    >>> s.spacing, s.crop, PreprocessSettings.from_dict(s.to_dict()) == s
    ((2.0, 1.0, 1.0), (32, 128, 128), True)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lungcore.data.io import CTImage

@dataclass(frozen=True)
class PreprocessSettings:
    """Target grid and crop. ``spacing`` (sz, sy, sx) mm; ``crop`` (D, H, W) output voxels;
    ``window`` (low, high) HU mapped to [0, 1]; ``order`` 0 nearest / 1 trilinear / 3 cubic; ``fill`` HU
    outside the scan; ``canonical`` reorients to the canonical axial frame first."""

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
        window = tuple(float(w) for w in self.window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"window must be (low, high) HU with low < high, got {self.window!r}")
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
        from lungcore.data.schema import canonical_kind

        return cls.csfnet() if canonical_kind(kind) == "nodules" else cls.cmml()

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def canonical_orientation(image: CTImage) -> CTImage:
    """``image`` with array axes permuted/flipped so that depth, height and width run along world
    +z (superior), +y (posterior) and +x (left) as closely as the scan allows. No resampling: the
    array is a strided view and the affine follows it. Obliquely tilted scans keep their tilt."""
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
