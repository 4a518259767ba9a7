"""lungcore.ops"""
from lungcore.ops.attention import masked_cross_attention, masked_cross_attention_reference  # noqa: F401
