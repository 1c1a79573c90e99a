"""The device's settings, read from Flower's node config (or derived in simulation).

Node config keys, set with ``flower-supernode --node-config '...'``:

``household`` (str, required)
    Household id; equals the O field of the device certificate.
``device`` (str, required)
    Device name, unique in the household; equals the certificate's name.
``listen`` (str, required)
    ``HOST:PORT`` on which the device accepts its upstream neighbour. Port 0
    picks a free port per round and publishes it in `rendezvous-dir`, which
    works only when all devices share one file system (tests, simulation).
``advertise`` (str, default: `listen`)
    ``HOST:PORT`` that the upstream neighbour dials, when it differs from
    `listen` (for example ``listen=0.0.0.0:9100`` behind a LAN address).
``bundle`` (str)
    Folder of the device's TLS bundle (``homesplit household enroll``).
    Required unless ``insecure-links=true``.
``insecure-links`` (bool, default false)
    Use plaintext TCP links inside the household. Only for tests.
``holds-data`` (bool, default false)
    True on the household's data owner, which runs stage 0.
``partition-id``, ``num-partitions`` (int)
    Passed to the app's data loader on the data owner.
``rendezvous-dir`` (str, default: a folder per run in the temp folder)
    Where port-0 listeners publish their ports.
``threads`` (int, default 1)
    torch intra-op threads of the stage.
``idle-watts``, ``busy-watts`` (float, optional)
    Power draw of the device while waiting and while computing, in watts.
``return-freed-memory`` (bool, default false)
    Give freed tensor memory back to the system at once, so the stage's peak
    RSS follows its live tensors as the planner's memory model assumes. Set it
    on devices with little memory; it costs page faults on large tensors.
    Give both or neither; the energy objective of the planner needs them.

In Flower's simulation engine the node config only has ``partition-id`` and
``num-partitions``. Then the run config key ``household-layout`` (see
`homesplit.layout`) names the households and devices, ``bundle-root`` contains
one bundle per ``HOUSEHOLD/DEVICE``, listeners use port 0, and
``insecure-links`` in the run config allows plaintext.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homesplit.errors import ConfigError
from homesplit.layout import parse_layout, simulated_device
from homesplit.pki import validate_name

__all__ = ["DeviceConfig", "read_device_config"]

_KNOWN_KEYS = {
    "household", "device", "listen", "advertise", "bundle", "insecure-links", "holds-data",
    "partition-id", "num-partitions", "rendezvous-dir", "threads", "idle-watts", "busy-watts",
    "return-freed-memory",
}  # fmt: skip


@dataclass(frozen=True)
class DeviceConfig:
    """Settings of one device, from its node config.

    Attributes mirror the node config keys in this module's docstring;
    `simulated` is True when they were derived from a simulation partition id.
    `idle_watts` and `busy_watts` are None when the node config has no power figures.
    `node_config` and `run_config` are Flower's, for the app's data loader.
    """

    household: str
    device: str
    listen: str
    advertise: str
    bundle: str | None
    insecure_links: bool
    holds_data: bool
    partition_id: int | None
    num_partitions: int | None
    rendezvous_dir: Path
    threads: int
    simulated: bool
    node_config: Mapping[str, Any]
    run_config: Mapping[str, Any]
    idle_watts: float | None = None
    busy_watts: float | None = None
    return_freed_memory: bool = False


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"node config {key}={value!r} is not a boolean; write {key}=true or {key}=false")


def read_device_config(node_config: Mapping[str, Any], run_config: Mapping[str, Any], run_id: int) -> DeviceConfig:
    """Read the device's settings from Flower's node config and run config.

    Raises
    ------
    ConfigError
        If a required key is missing or a value is invalid; the message names the key.
    """
    default_rendezvous = Path(tempfile.gettempdir()) / f"homesplit-rendezvous-{run_id}"
    if "household" not in node_config and "partition-id" in node_config:
        return _simulated(node_config, run_config, default_rendezvous)
    for key in ("household", "device", "listen"):
        if key not in node_config:
            raise ConfigError(
                f"node config key {key!r} is missing; start the SuperNode with "
                "--node-config 'household=\"...\" device=\"...\" listen=\"HOST:PORT\" bundle=\"DIR\"'"
            )
    unknown = sorted(set(node_config) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"node config keys {unknown} are unknown; allowed keys are {sorted(_KNOWN_KEYS)}")
    insecure = _flag(node_config.get("insecure-links", False), "insecure-links")
    bundle = node_config.get("bundle")
    if not insecure and not bundle:
        raise ConfigError("node config key 'bundle' is missing; pass the device bundle folder, or insecure-links=true for tests")
    listen = str(node_config["listen"])
    idle_watts, busy_watts = _power(node_config)
    return DeviceConfig(
        household=validate_name(str(node_config["household"]), "node config household"),
        device=validate_name(str(node_config["device"]), "node config device"),
        listen=listen,
        advertise=str(node_config.get("advertise", listen)),
        bundle=None if insecure else str(bundle),
        insecure_links=insecure,
        holds_data=_flag(node_config.get("holds-data", False), "holds-data"),
        partition_id=_optional_int(node_config, "partition-id"),
        num_partitions=_optional_int(node_config, "num-partitions"),
        rendezvous_dir=Path(str(node_config.get("rendezvous-dir", default_rendezvous))),
        threads=int(node_config.get("threads", 1)),
        simulated=False,
        node_config=dict(node_config),
        run_config=dict(run_config),
        idle_watts=idle_watts,
        busy_watts=busy_watts,
        return_freed_memory=_flag(node_config.get("return-freed-memory", False), "return-freed-memory"),
    )


def _power(node_config: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Read ``idle-watts`` and ``busy-watts``: both or neither, finite, at least 0, busy not below idle."""
    watts: dict[str, float | None] = {}
    for key in ("idle-watts", "busy-watts"):
        if key not in node_config:
            watts[key] = None
            continue
        try:
            value = float(node_config[key])
        except (TypeError, ValueError):
            raise ConfigError(f"node config {key}={node_config[key]!r} is not a number of watts") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"node config {key}={node_config[key]!r} is invalid; it must be a finite number of watts, at least 0")
        watts[key] = value
    idle, busy = watts["idle-watts"], watts["busy-watts"]
    if (idle is None) != (busy is None):
        raise ConfigError("node config gives only one of idle-watts and busy-watts; give both or neither")
    if idle is not None and busy < idle:
        raise ConfigError(f"node config busy-watts={busy} is below idle-watts={idle}; busy power includes idle power")
    return idle, busy


def _optional_int(config: Mapping[str, Any], key: str) -> int | None:
    if key not in config:
        return None
    try:
        return int(config[key])
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key}={config[key]!r} is not an integer") from None


def _simulated(node_config: Mapping[str, Any], run_config: Mapping[str, Any], rendezvous: Path) -> DeviceConfig:
    if "household-layout" not in run_config:
        raise ConfigError(
            "in simulation the run config key 'household-layout' is required, e.g. "
            "household-layout=\"laptop+phone,laptop+phone\"; it maps partition ids to household devices"
        )
    layout = parse_layout(str(run_config["household-layout"]))
    sim = simulated_device(layout, int(node_config["partition-id"]), int(node_config["num-partitions"]))
    insecure = _flag(run_config.get("insecure-links", False), "insecure-links")
    root = str(run_config.get("bundle-root", ""))
    if not insecure and not root:
        raise ConfigError(
            "in simulation the run config key 'bundle-root' is required (a folder with HOUSEHOLD/DEVICE bundles), "
            "or insecure-links=true for plaintext links"
        )
    return DeviceConfig(
        household=sim.household,
        device=sim.device,
        listen="127.0.0.1:0",
        advertise="127.0.0.1:0",
        bundle=None if insecure else os.path.join(root, sim.household, sim.device),
        insecure_links=insecure,
        holds_data=sim.holds_data,
        partition_id=sim.household_index,
        num_partitions=sim.num_households,
        rendezvous_dir=rendezvous,
        threads=1,
        simulated=True,
        node_config=dict(node_config),
        run_config=dict(run_config),
    )
