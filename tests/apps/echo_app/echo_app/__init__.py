"""Flower test app that echoes node configs and a small array."""
