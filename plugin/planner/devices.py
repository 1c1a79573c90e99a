"""Load and validate a household's devices.yaml.

The file is either a list of devices, each with a ``name``::

    - name: laptop
      speed: 1.0
      memory: 8GiB
      idle_watts: 6
      busy_watts: 35
      links:
        pi: {bandwidth: 100Mbit/s, latency: 3ms}
    - name: pi
      speed: 0.15
      memory: 512MiB

or a mapping from device name to the same keys without ``name``. ``speed`` and
``memory`` are required. ``links`` maps a peer's name to the link from this
device to that peer. A link listed in one direction only is assumed to be the
same in the other, and pairs listed in neither direction get the default link.
"""

from __future__ import annotations

import logging
import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from homesplit.errors import ConfigError
from homesplit.planner.profiles import DEFAULT_LINK, DeviceProfile, LinkProfile, LinkTable

__all__ = ["HouseholdDevices", "load_devices", "parse_devices", "parse_bytes", "parse_bandwidth", "parse_seconds"]

logger = logging.getLogger(__name__)

DEVICE_KEYS = ("name", "speed", "memory", "idle_watts", "busy_watts", "links")
LINK_KEYS = ("bandwidth", "latency")

_BYTE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_BIT_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "Mbit": 1e6 / 8, "Gbit": 1e9 / 8}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
# Values in error messages are shortened, because a YAML alias bomb expands to
# millions of elements that repr would spell out.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlevel = 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_QUANTITY = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class HouseholdDevices:
    """The devices and links of one household, as read from devices.yaml.

    Parameters
    ----------
    devices : list of DeviceProfile
        Devices in file order.
    links : LinkTable
        Links listed under the devices, with the default for the rest.
    """

    devices: list[DeviceProfile]
    links: LinkTable


def load_devices(path: str | Path, *, default_link: LinkProfile = DEFAULT_LINK) -> HouseholdDevices:
    """Read and validate a devices.yaml file.

    Parameters
    ----------
    path : str or Path
        The YAML file, in the format of this module's docstring.
    default_link : LinkProfile, default DEFAULT_LINK
        Link for device pairs the file does not list.

    Raises
    ------
    ConfigError
        If the file is missing or not YAML, or a device is invalid; the
        message names the file, the device, the key and the value.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the devices file: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: the devices file is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    try:
        return parse_devices(data, default_link=default_link)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def parse_devices(data: Any, *, default_link: LinkProfile = DEFAULT_LINK) -> HouseholdDevices:
    """Validate devices already loaded from YAML or JSON; see `load_devices`."""
    entries = _device_entries(data)
    devices: list[DeviceProfile] = []
    raw_links: dict[tuple[str, str], Any] = {}
    for entry in entries:
        device, links = _parse_device(entry)
        if any(existing.name == device.name for existing in devices):
            raise ConfigError(f"device name {device.name!r} appears twice; give every device its own name")
        devices.append(device)
        for peer, link in links.items():
            raw_links[(device.name, peer)] = link

    names = {device.name for device in devices}
    links = {}
    for (source, target), link in raw_links.items():
        if target not in names:
            raise ConfigError(f"device {source!r}: links names {target!r}, which is not a device in the file")
        if target == source:
            raise ConfigError(f"device {source!r}: links names the device itself")
        links[(source, target)] = _parse_link(source, target, link)
    logger.debug("read %d devices and %d links", len(devices), len(links))
    return HouseholdDevices(devices=devices, links=LinkTable(links=links, default=default_link))


def _device_entries(data: Any) -> list[dict[str, Any]]:
    """Return one dict per device, with the name filled in from a mapping's key."""
    if isinstance(data, list):
        entries = data
    elif isinstance(data, Mapping):
        entries = []
        for name, entry in data.items():
            if not isinstance(entry, Mapping):
                raise ConfigError(f"device {_SHORT.repr(name)} must be a mapping of keys, not {_SHORT.repr(entry)}")
            if "name" in entry and entry["name"] != name:
                raise ConfigError(f"device {_SHORT.repr(name)}: key 'name' has value {_SHORT.repr(entry['name'])}; drop it or make it match")
            entries.append({**entry, "name": name})
    else:
        raise ConfigError(f"expected a list or mapping of devices, not {type(data).__name__}")
    if not entries:
        raise ConfigError("no devices are listed; list at least one")
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ConfigError(f"every device must be a mapping of keys, not {_SHORT.repr(entry)}")
    return entries


def _parse_device(entry: Mapping[str, Any]) -> tuple[DeviceProfile, Mapping[str, Any]]:
    if "name" not in entry:
        raise ConfigError(f"a device has no 'name' key: {_SHORT.repr(dict(entry))}")
    name = entry["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"key 'name' has value {_SHORT.repr(name)}; a device name must be a non-empty string")
    where = f"device {name!r}"
    for key in entry:
        if key not in DEVICE_KEYS:
            known = ", ".join(DEVICE_KEYS)
            raise ConfigError(f"{where}: unknown key {_SHORT.repr(key)} with value {_SHORT.repr(entry[key])}; known keys: {known}")
    for key in ("speed", "memory"):
        if key not in entry:
            raise ConfigError(f"{where}: key {key!r} is missing")

    speed = _number(entry["speed"], where, "speed")
    if speed <= 0:
        raise ConfigError(f"{where}: key 'speed' has value {entry['speed']!r}; it must be positive")
    memory = parse_bytes(entry["memory"], where=where, key="memory")
    watts = {}
    for key in ("idle_watts", "busy_watts"):
        if entry.get(key) is not None:
            watts[key] = _number(entry[key], where, key)
            if watts[key] < 0:
                raise ConfigError(f"{where}: key {key!r} has value {entry[key]!r}; it must not be negative")
    if len(watts) == 1:
        raise ConfigError(f"{where}: give both idle_watts and busy_watts, or neither")
    if watts and watts["busy_watts"] < watts["idle_watts"]:
        raise ConfigError(
            f"{where}: busy_watts={entry['busy_watts']!r} is below idle_watts={entry['idle_watts']!r}"
        )

    links = entry.get("links") or {}
    if not isinstance(links, Mapping):
        raise ConfigError(f"{where}: key 'links' has value {_SHORT.repr(links)}; it must map peer names to links")
    device = DeviceProfile(name=name, speed=speed, memory_bytes=memory, **watts)
    return device, links


def _parse_link(source: str, target: str, link: Any) -> LinkProfile:
    where = f"device {source!r}: link to {target!r}"
    if not isinstance(link, Mapping):
        raise ConfigError(f"{where} has value {_SHORT.repr(link)}; it must be a mapping with bandwidth and latency")
    for key in link:
        if key not in LINK_KEYS:
            known = ", ".join(LINK_KEYS)
            raise ConfigError(f"{where}: unknown key {_SHORT.repr(key)} with value {_SHORT.repr(link[key])}; known keys: {known}")
    for key in LINK_KEYS:
        if key not in link:
            raise ConfigError(f"{where}: key {key!r} is missing")
    bandwidth = parse_bandwidth(link["bandwidth"], where=where, key="bandwidth")
    latency = parse_seconds(link["latency"], where=where, key="latency")
    return LinkProfile(bandwidth_bytes_per_second=bandwidth, latency_seconds=latency)


def parse_bytes(value: Any, *, where: str = "", key: str = "memory") -> int:
    """Return a byte count from a number or a string such as "512MiB" or "2GB".

    Raises
    ------
    ConfigError
        If the value is not a size or is negative; the message names `where` and `key`.
    """
    number, unit = _quantity(value, where, key)
    unit = unit or "B"
    if unit not in _BYTE_UNITS:
        raise _invalid(where, key, value, f"use bytes or a unit of {', '.join(_BYTE_UNITS)}")
    size = _finite(number * _BYTE_UNITS[unit], value, where, key)
    if size < 0:
        raise _invalid(where, key, value, "it must not be negative")
    return int(size)


def parse_bandwidth(value: Any, *, where: str = "", key: str = "bandwidth") -> float:
    """Return bytes per second from a number or a string such as "100Mbit/s" or "5MB/s"."""
    text = value.removesuffix("/s") if isinstance(value, str) else value
    number, unit = _quantity(text, where, key)
    unit = unit or "B"
    scale = _BYTE_UNITS.get(unit) or _BIT_UNITS.get(unit)
    if scale is None:
        units = ", ".join(f"{name}/s" for name in [*_BYTE_UNITS, *_BIT_UNITS])
        raise _invalid(where, key, value, f"use bytes per second or a unit of {units}")
    bandwidth = _finite(number * scale, value, where, key)
    if bandwidth <= 0:
        raise _invalid(where, key, value, "it must be positive")
    return bandwidth


def parse_seconds(value: Any, *, where: str = "", key: str = "latency") -> float:
    """Return seconds from a number or a string such as "3ms", "250us" or "0.01s"."""
    number, unit = _quantity(value, where, key)
    scale = _TIME_UNITS.get(unit or "s")
    if scale is None:
        raise _invalid(where, key, value, f"use seconds or a unit of {', '.join(_TIME_UNITS)}")
    if number < 0:
        raise _invalid(where, key, value, "it must not be negative")
    return number * scale


def _quantity(value: Any, where: str, key: str) -> tuple[float, str]:
    """Split a number with an optional unit; the unit of a bare number is ""."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(_float(value, where, key), value, where, key), ""
    match = _QUANTITY.match(value) if isinstance(value, str) else None
    if match is None:
        raise _invalid(where, key, value, "it must be a number with an optional unit")
    return _finite(float(match.group(1)), value, where, key), match.group(2)


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(where, key, value, "it must be a number")
    return _finite(_float(value, where, key), value, where, key)


def _float(value: int | float, where: str, key: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise _invalid(where, key, value, "it must be finite") from None


def _finite(number: float, value: Any, where: str, key: str) -> float:
    if not math.isfinite(number):
        raise _invalid(where, key, value, "it must be finite")
    return number


def _invalid(where: str, key: str, value: Any, advice: str) -> ConfigError:
    prefix = f"{where}: " if where else ""
    return ConfigError(f"{prefix}key {key!r} has invalid value {_SHORT.repr(value)}; {advice}")
