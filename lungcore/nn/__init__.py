"""lungcore.nn"""
