"""lungcore.models"""
