"""lungcore.ops"""
from lungcore.ops.patch_embed import patch_embed3d, patch_embed3d_reference  # noqa: E402,F401
