"""lungcore.data"""
