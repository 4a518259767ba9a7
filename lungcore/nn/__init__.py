"""lungcore.nn"""
from lungcore.nn.survival import CoxPHLoss  # noqa: E402,F401
