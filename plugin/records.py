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
    "PRIVACY",
    "PRIVACY_STATUS",
    "LINK_PROBE",
    "LINKS",
    "QUERY_DISCOVER",
    "QUERY_PROBE_LINKS",
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

# Message type of the link probe that follows discovery; routes to
# ``@app.query("probe_links")``. The request carries a LINK_PROBE ConfigRecord,
# and the data owner's reply a LINKS ConfigRecord.
QUERY_PROBE_LINKS = "query.probe_links"
LINK_PROBE = "link-probe"
LINKS = "links"

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

# Key of a household's DP settings for the round (JSON of
# `homesplit.privacy.settings.RoundPrivacy`) in the config record of train messages.
PRIVACY = "homesplit-privacy"

# Name of the ConfigRecord with ``status`` and ``message`` in a data owner's
# reply when it declines a round; the status is "budget_exhausted".
PRIVACY_STATUS = "privacy"
