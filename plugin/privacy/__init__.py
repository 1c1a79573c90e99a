"""Differential privacy for the updates that leave a household."""
