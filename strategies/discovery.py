"""Discovery: ask every node who it is, and group the answers into households."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from homesplit.household_plan import DeviceInfo
from homesplit.records import DEVICE, QUERY_DISCOVER

__all__ = ["discover_devices", "group_households", "wait_for_nodes"]

logger = logging.getLogger(__name__)

_NODE_POLL_SECONDS = 0.5


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """Poll `grid` until at least `min_nodes` nodes are connected, then return their ids.

    Returns whatever is connected when `timeout` seconds have passed, so the
    caller decides whether too few nodes is an error.
    """
    deadline = time.monotonic() + timeout
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < min_nodes and time.monotonic() < deadline:
        time.sleep(_NODE_POLL_SECONDS)
        node_ids = sorted(grid.get_node_ids())
    if len(node_ids) < min_nodes:
        logger.warning("Only %d of min_available_nodes=%d nodes connected within %.0f s", len(node_ids), min_nodes, timeout)
    return node_ids


def discover_devices(grid: Grid, node_ids: Iterable[int], *, timeout: float) -> list[DeviceInfo]:
    """Send a discovery query to every node and return the devices that answered.

    A node that replies with an error or not at all within `timeout` seconds
    is logged at WARNING and left out.
    """
    messages = [
        Message(RecordDict(), dst_node_id=node_id, message_type=QUERY_DISCOVER, group_id="discover")
        for node_id in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

    devices = []
    answered = set()
    for reply in replies:
        node_id = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node_id)
        if reply.has_error():
            logger.warning("Node %d failed the discovery query: %s", node_id, reply.error.reason)
            continue
        record = reply.content.config_records.get(DEVICE)
        if record is None:
            logger.warning("Node %d replied to the discovery query without a %r record; is it a homesplit device?", node_id, DEVICE)
            continue
        devices.append(_device_info(node_id, record))
    for node_id in sorted(set(destination.values()) - answered):
        logger.warning("Node %d did not reply to the discovery query within %.0f s", node_id, timeout)
    return devices


def _device_info(node_id: int, record: ConfigRecord) -> DeviceInfo:
    return DeviceInfo(
        household=str(record["household"]),
        device=str(record["device"]),
        address=str(record["address"]),
        node_id=node_id,
        holds_data=bool(record["holds-data"]),
        num_examples=int(record["num-examples"]),
        memory_bytes=int(record["memory-bytes"]),
        cpu_count=int(record["cpu-count"]),
        flops_per_second=_optional_float(record, "flops-per-second"),
        idle_watts=_optional_float(record, "idle-watts"),
        busy_watts=_optional_float(record, "busy-watts"),
    )


def _optional_float(record: ConfigRecord, key: str) -> float | None:
    """Return a key that older devices do not send, or None when it is absent."""
    return float(record[key]) if key in record else None


def group_households(devices: Iterable[DeviceInfo]) -> dict[str, list[DeviceInfo]]:
    """Group devices by household id, each household's devices sorted by name.

    A device name reported twice in one household (two SuperNodes configured
    alike) keeps the first node and logs a WARNING naming both nodes.
    """
    households: dict[str, dict[str, DeviceInfo]] = defaultdict(dict)
    for info in sorted(devices, key=lambda d: d.node_id):
        known = households[info.household].get(info.device)
        if known is not None:
            logger.warning(
                "Household %s: device %s is reported by nodes %d and %d; ignoring node %d, give each device its own name",
                info.household, info.device, known.node_id, info.node_id, info.node_id,
            )  # fmt: skip
            continue
        households[info.household][info.device] = info
    return {h: sorted(d.values(), key=lambda i: i.device) for h, d in sorted(households.items())}
