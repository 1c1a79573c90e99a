"""Flower ClientApp for the devices of a household."""
