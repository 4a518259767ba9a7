"""lungcore.ops: the differentiable ops (reference beside kernel, dispatch by backend)."""
from lungcore.ops.attention import masked_cross_attention, masked_cross_attention_reference  # noqa: F401
from lungcore.ops.patch_embed import patch_embed3d, patch_embed3d_reference  # noqa: F401
from lungcore.ops.cox import cox_ph_loss, cox_ph_loss_reference  # noqa: E402,F401
from lungcore.ops.resample import (  # noqa: F401
    crop_starts,
    resample_crop,
    resample_volume,
    resampled_affine,
    resampled_shape,
)
