"""Names of the Flower records and keys that the strategy and the device ClientApp share.

Plain strings, so that `homesplit.strategies` and `homesplit.clients` agree
on them without importing each other, and the core stays free of Flower.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS",
    "CONFIG",
    "DEVICE",
    "METRICS",
    "PLAN",
    "QUERY_DISCOVER",
    "REPLY_KEYS",
]

# Record names in a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
DEVICE = "device"

# Key of the household plan (JSON) in the config record of train and evaluate messages.
PLAN = "homesplit-plan"

# Message type of the discovery query; routes to ``@app.query("discover")``.
QUERY_DISCOVER = "query.discover"

# Keys of the "device" ConfigRecord of a discovery reply.
REPLY_KEYS = (
    "household",
    "device",
    "address",
    "holds-data",
    "num-examples",
    "memory-bytes",
    "cpu-count",
)
