"""lungcore.ops"""
