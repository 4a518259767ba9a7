"""lungcore.train"""
