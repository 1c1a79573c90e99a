"""Flower ClientApp for the devices of a household.

`device_app` builds the ClientApp from the user's model factory, data loader
and loss; `homesplit.clients.node` documents the node config keys.
"""

from homesplit.clients.app import DeviceData, device_app
from homesplit.clients.node import DeviceConfig, read_device_config

__all__ = ["DeviceConfig", "DeviceData", "device_app", "read_device_config"]
