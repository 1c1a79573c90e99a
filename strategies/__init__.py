"""Flower strategies that train households as pipelines and federate them.

`HomesplitStrategy` replaces FedAvg in a ServerApp: it discovers the devices
with a query, plans each household's split, sends each device only its own
segment and averages the segment updates by parameter name.
"""

from homesplit.strategies.aggregation import HouseholdOutcome, average_by_name, collect_outcomes
from homesplit.strategies.strategy import HomesplitStrategy

__all__ = ["HomesplitStrategy", "HouseholdOutcome", "average_by_name", "collect_outcomes"]
