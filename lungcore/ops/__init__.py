"""lungcore.ops"""
from lungcore.ops.cox import cox_ph_loss, cox_ph_loss_reference  # noqa: E402,F401
