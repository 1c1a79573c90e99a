"""Flower strategies that train households as pipelines and federate them."""
