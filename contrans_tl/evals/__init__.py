"""Evaluations of the ConTrans paper (emotion transplant first)."""
