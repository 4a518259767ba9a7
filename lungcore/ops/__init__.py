"""lungcore.ops"""
from lungcore.ops.resample import (  # noqa: F401
    crop_starts,
    resample_crop,
    resample_volume,
    resampled_affine,
    resampled_shape,
)
