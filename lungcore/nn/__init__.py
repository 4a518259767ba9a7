"""lungcore.nn"""
from lungcore.nn.attention import MaskedCrossAttention  # noqa: F401
