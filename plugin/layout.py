"""Households of a simulated federation, derived from Flower partition ids.

Flower's simulation engine numbers its SuperNodes 0 to N-1 (``partition-id``).
A layout string such as ``"laptop+phone,laptop+phone+raspberry-pi"`` assigns
them in order: partition 0 is household-1's laptop, 1 its phone, 2
household-2's laptop, and so on. The first device of each household holds
its data.
"""

from __future__ import annotations

from dataclasses import dataclass

from homesplit.errors import ConfigError
from homesplit.pki import validate_name

__all__ = ["SimulatedDevice", "parse_layout", "simulated_device"]


@dataclass(frozen=True)
class SimulatedDevice:
    """The device that one partition id stands for."""

    household: str
    device: str
    household_index: int
    num_households: int
    holds_data: bool


def parse_layout(text: str) -> list[list[str]]:
    """Parse ``"dev+dev,dev+dev+dev"`` into device names per household.

    Raises
    ------
    ConfigError
        If a household is empty, a name is invalid, or a household repeats a name.
    """
    households = []
    for index, part in enumerate(str(text).split(",")):
        names = [name.strip() for name in part.split("+") if name.strip()]
        if not names:
            raise ConfigError(f"household {index + 1} in layout {text!r} has no devices; write e.g. 'laptop+phone,laptop+phone'")
        for name in names:
            validate_name(name, f"device name in layout {text!r}:")
        if len(set(names)) != len(names):
            raise ConfigError(f"household {index + 1} in layout {text!r} names a device twice; device names must differ")
        households.append(names)
    return households


def simulated_device(layout: list[list[str]], partition_id: int, num_partitions: int) -> SimulatedDevice:
    """Return the device that `partition_id` stands for.

    Raises
    ------
    ConfigError
        If the layout's device count differs from `num_partitions`.
    """
    total = sum(len(names) for names in layout)
    if total != num_partitions:
        raise ConfigError(
            f"the household layout has {total} devices but the simulation has num-supernodes={num_partitions}; "
            "make them equal"
        )
    offset = 0
    for index, names in enumerate(layout):
        if partition_id < offset + len(names):
            position = partition_id - offset
            return SimulatedDevice(f"household-{index + 1}", names[position], index, len(layout), position == 0)
        offset += len(names)
    raise ConfigError(f"partition-id={partition_id} is outside 0..{num_partitions - 1}")
