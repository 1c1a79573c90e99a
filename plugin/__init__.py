"""homesplit: train one model split across a household's trusted devices.

The core package never imports Flower. The Flower strategy lives in
`homesplit.strategies` and the device ClientApp in `homesplit.clients`.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flwr-homesplit")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
