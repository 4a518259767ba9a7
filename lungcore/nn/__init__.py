"""lungcore.nn: nn.Module wrappers of the ops."""
from lungcore.nn.attention import MaskedCrossAttention  # noqa: F401
from lungcore.nn.patch_embed import PatchEmbed3d, sincos_position_embedding_3d  # noqa: F401
from lungcore.nn.survival import CoxPHLoss  # noqa: E402,F401
