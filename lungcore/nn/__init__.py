"""lungcore.nn"""
from lungcore.nn.patch_embed import PatchEmbed3d, sincos_position_embedding_3d  # noqa: E402,F401
