"""Plan a household from the devices' discovery replies.

The strategy asks every device of a household to describe itself and gets one
plain dict per device. `plan_from_discovery` turns those dicts into
`DeviceProfile` objects, pins stage 0 to the device that holds the data, and
calls `plan_household`. It does no I/O, so the strategy can call it on the
server and tests can call it with hand-written replies.

A discovery reply has these keys:

=================  ========  ======================================================
key                required  meaning
=================  ========  ======================================================
device             yes       device name, unique within the household
memory_bytes       yes       memory available for training, in bytes
speed              one of    compute speed relative to the reference device
flops_per_second   the two   matrix-multiply throughput, in FLOP/s; divided by
                             the profile's reference throughput to get the speed
holds_data         no        whether the device stores the household's data
num_examples       no        training examples the device stores
runtime_bytes      no        memory of the Python and PyTorch runtime of a stage
                             process on the device, in bytes
idle_watts         no        power draw while waiting, in watts
busy_watts         no        power draw while computing, in watts
=================  ========  ======================================================

Other keys are ignored, so devices can send more than the planner reads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from homesplit.errors import ConfigError
from homesplit.planner.optimize import plan_household
from homesplit.planner.plan import Plan
from homesplit.planner.profiles import DeviceProfile, LinkTable, ModelProfile

__all__ = ["REPORT_KEYS", "devices_from_discovery", "data_owner_from_discovery", "plan_from_discovery"]

logger = logging.getLogger(__name__)

REPORT_KEYS = (
    "device",
    "memory_bytes",
    "speed",
    "flops_per_second",
    "holds_data",
    "num_examples",
    "runtime_bytes",
    "idle_watts",
    "busy_watts",
)
"""Keys of a discovery reply that the planner reads."""


def devices_from_discovery(
    reports: Sequence[Mapping[str, Any]],
    *,
    reference_flops_per_second: float | None = None,
    runtime_bytes: int = 0,
) -> list[DeviceProfile]:
    """Convert discovery replies into device profiles, in reply order.

    Parameters
    ----------
    reports : sequence of mapping
        One reply per device, with the keys of this module's docstring.
    reference_flops_per_second : float or None, default None
        Throughput of the device that profiled the model, in FLOP/s; needed
        only for replies that give ``flops_per_second`` instead of ``speed``.
    runtime_bytes : int, default 0
        Memory of the Python and PyTorch runtime of one stage process, in
        bytes, for replies without their own ``runtime_bytes``. It is taken
        off each device's ``memory_bytes``, because the planner's memory
        model counts only the segment's tensors.

    Raises
    ------
    ConfigError
        If a reply lacks a required key, has an invalid value, or names a
        device twice; the message names the device, the key and the value.
    """
    if not reports:
        raise ConfigError("no discovery replies; a household needs at least one device")
    _check_bytes(runtime_bytes, "runtime_bytes", where="plan_from_discovery")
    devices: list[DeviceProfile] = []
    for report in reports:
        device = _device_from_report(report, reference_flops_per_second, runtime_bytes)
        if any(existing.name == device.name for existing in devices):
            raise ConfigError(f"device {device.name!r} replied twice to discovery; device names must be unique")
        devices.append(device)
    return devices


def data_owner_from_discovery(reports: Sequence[Mapping[str, Any]]) -> str:
    """Return the name of the device that streams the data: the one with ``holds_data``.

    When several devices hold data, the one with the most ``num_examples``
    wins (the first in reply order on a tie), and a warning names the others,
    whose data this plan does not use.

    Raises
    ------
    ConfigError
        If no device holds data.
    """
    owners = [report for report in reports if _flag(report, "holds_data")]
    if not owners:
        names = ", ".join(repr(report.get("device")) for report in reports)
        raise ConfigError(f"no device holds data among {names}; set holds_data on the device that stores it")
    best = max(owners, key=lambda report: _count(report, "num_examples"))
    if len(owners) > 1:
        others = ", ".join(repr(report["device"]) for report in owners if report is not best)
        logger.warning(
            "several devices hold data; %r streams it and the data on %s is not used by this plan",
            best["device"],
            others,
        )
    return str(best["device"])


def plan_from_discovery(
    model_profile: ModelProfile,
    reports: Sequence[Mapping[str, Any]],
    links: LinkTable | None = None,
    *,
    batch_size: int,
    objective: str = "time",
    schedule: str = "1f1b",
    optimizer: str = "adam",
    microbatch_candidates: Iterable[int] | None = None,
    runtime_bytes: int = 0,
    data_owner: str | None = None,
) -> Plan:
    """Plan one household from its devices' discovery replies.

    Parameters
    ----------
    model_profile : ModelProfile
        Layer profile of the model, measured on the reference device. Its
        `stage_overhead_seconds`, when measured, is charged to every stage
        per micro-batch.
    reports : sequence of mapping
        One discovery reply per device; see this module's docstring.
    links : LinkTable or None, default None
        Measured or configured links between the devices; None assumes
        `DEFAULT_LINK` everywhere.
    batch_size : int
        Samples per mini-batch.
    objective : {"time", "energy"}, default "time"
        What to minimise; "energy" needs both power figures in every reply.
    schedule : {"gpipe", "1f1b"}, default "1f1b"
        Pipeline schedule, which sets the activation memory of each stage.
    optimizer : str, default "adam"
        Optimizer kind whose state counts towards memory.
    microbatch_candidates : iterable of int or None, default None
        Passed to `plan_household`.
    runtime_bytes : int, default 0
        Passed to `devices_from_discovery`.
    data_owner : str or None, default None
        Device that runs stage 0; None takes `data_owner_from_discovery`.

    Returns
    -------
    Plan
        The plan, with stage 0 on the data owner.

    Raises
    ------
    ConfigError
        If a reply is invalid, no device holds data, or `data_owner` replied
        to nothing.
    PlanError
        If no plan fits the devices' memory.
    """
    devices = devices_from_discovery(
        reports,
        reference_flops_per_second=model_profile.reference_flops_per_second,
        runtime_bytes=runtime_bytes,
    )
    owner = data_owner if data_owner is not None else data_owner_from_discovery(reports)
    return plan_household(
        model_profile.layers,
        devices,
        links,
        batch_size=batch_size,
        objective=objective,
        schedule=schedule,
        microbatch_candidates=microbatch_candidates,
        optimizer=optimizer,
        data_owner=owner,
        stage_overhead_seconds=model_profile.stage_overhead_seconds or 0.0,
    )


def _device_from_report(
    report: Mapping[str, Any], reference_flops_per_second: float | None, default_runtime_bytes: int
) -> DeviceProfile:
    if not isinstance(report, Mapping):
        raise ConfigError(f"a discovery reply must be a mapping of keys, not {report!r}")
    name = report.get("device")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"discovery reply has key 'device' with value {name!r}; it must be a non-empty string")
    where = f"device {name!r}"

    if "memory_bytes" not in report:
        raise ConfigError(f"{where}: discovery reply lacks key 'memory_bytes'")
    memory = _check_bytes(report["memory_bytes"], "memory_bytes", where=where)
    runtime = default_runtime_bytes
    if report.get("runtime_bytes") is not None:
        runtime = _check_bytes(report["runtime_bytes"], "runtime_bytes", where=where)

    speed = _speed(report, where, reference_flops_per_second)
    watts = {key: _watts(report, key, where) for key in ("idle_watts", "busy_watts")}
    if (watts["idle_watts"] is None) != (watts["busy_watts"] is None):
        raise ConfigError(f"{where}: discovery reply gives only one of idle_watts and busy_watts; give both or neither")
    if watts["idle_watts"] is not None and watts["busy_watts"] < watts["idle_watts"]:
        raise ConfigError(f"{where}: busy_watts={watts['busy_watts']!r} is below idle_watts={watts['idle_watts']!r}")
    return DeviceProfile(name=name, speed=speed, memory_bytes=max(0, memory - runtime), **watts)


def _speed(report: Mapping[str, Any], where: str, reference_flops_per_second: float | None) -> float:
    if report.get("speed") is not None:
        return _positive(report["speed"], "speed", where)
    if report.get("flops_per_second") is None:
        raise ConfigError(f"{where}: discovery reply lacks both 'speed' and 'flops_per_second'; give one")
    flops = _positive(report["flops_per_second"], "flops_per_second", where)
    if reference_flops_per_second is None or not reference_flops_per_second > 0:
        raise ConfigError(
            f"{where}: key 'flops_per_second' needs a positive reference throughput, "
            f"got reference_flops_per_second={reference_flops_per_second!r}"
        )
    return flops / reference_flops_per_second


def _positive(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: key {key!r} has value {value!r}; it must be a positive finite number")
    return float(value)


def _watts(report: Mapping[str, Any], key: str, where: str) -> float | None:
    value = report.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: key {key!r} has value {value!r}; it must be a finite number of at least 0")
    return float(value)


def _check_bytes(value: Any, key: str, *, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: key {key!r} has value {value!r}; it must be a whole number of bytes, at least 0")
    return value


def _flag(report: Mapping[str, Any], key: str) -> bool:
    value = report.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"device {report.get('device')!r}: key {key!r} has value {value!r}; it must be true or false")
    return value


def _count(report: Mapping[str, Any], key: str) -> int:
    value = report.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"device {report.get('device')!r}: key {key!r} has value {value!r}; it must be an integer >= 0")
    return value
