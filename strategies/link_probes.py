"""The link probe step of discovery on the server: ask each data owner to measure its household links.

`homesplit.link_probes` describes the pairing (the data owner dials every
other device of its household in turn) and the deadlines.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from homesplit.errors import ConfigError
from homesplit.household_plan import DeviceInfo
from homesplit.link_probes import LinkProbeRequest, decode_results
from homesplit.planner.profiles import LinkProfile
from homesplit.records import LINK_PROBE, LINKS, QUERY_PROBE_LINKS

__all__ = ["probe_household_links", "with_measured_links"]

logger = logging.getLogger(__name__)


def probe_household_links(
    grid: Grid,
    households: Mapping[str, Sequence[DeviceInfo]],
    *,
    session: int,
    budget_seconds: float,
    timeout: float,
) -> dict[str, dict[str, LinkProfile]]:
    """Have the data owner of every household measure its link to each other device.

    Households with one device, or without exactly one data owner, are not
    probed. A failed or missing measurement is logged at WARNING with the
    household, the devices and the reason, and left out of the result.

    Parameters
    ----------
    grid : Grid
        The Flower grid.
    households : mapping of str to sequence of DeviceInfo
        Devices by household, as `group_households` returns them.
    session : int
        Probe session, at least 1 and new for every call in a run.
    budget_seconds : float
        Seconds a data owner may spend on one peer, connecting included.
    timeout : float
        Seconds to wait for the devices' processes to start and reply, on
        top of ``budget_seconds`` per peer of the largest household.

    Returns
    -------
    dict of str to dict of str to LinkProfile
        Household id to the measured link from its data owner to each peer.
    """
    requests: dict[str, tuple[DeviceInfo, LinkProbeRequest]] = {}
    messages: list[tuple[str, DeviceInfo, Message]] = []
    for household, devices in households.items():
        owners = [d for d in devices if d.holds_data]
        if len(devices) < 2 or len(owners) != 1:
            continue
        owner = owners[0]
        peers = sorted((d for d in devices if d is not owner), key=lambda d: d.device)
        request = LinkProbeRequest(
            session=session,
            owner=owner.device,
            peers=tuple(d.device for d in peers),
            addresses=tuple(d.address for d in peers),
            budget_seconds=budget_seconds,
        )
        requests[household] = (owner, request)
        for device in devices:
            content = RecordDict({LINK_PROBE: ConfigRecord(request.to_config())})
            message = Message(content, dst_node_id=device.node_id, message_type=QUERY_PROBE_LINKS, group_id=f"probe-links-{session}")
            messages.append((household, device, message))
    if not messages:
        return {}

    max_peers = max(len(request.peers) for _, request in requests.values())
    wait = timeout + max_peers * budget_seconds
    logger.info("Measuring the links of %d households (session %d, up to %.0f s)", len(requests), session, wait)
    replies = list(grid.send_and_receive([m for _, _, m in messages], timeout=wait))
    by_id = {m.metadata.message_id: (household, device) for household, device, m in messages}
    owner_replies: dict[str, Message] = {}
    for reply in replies:
        household, device = by_id.get(reply.metadata.reply_to_message_id, (None, None))
        if household is None:
            continue
        if reply.has_error():
            logger.warning("Household %s: device %s failed the link probe: %s", household, device.device, reply.error.reason)
        elif device.device == requests[household][1].owner:
            owner_replies[household] = reply

    measured: dict[str, dict[str, LinkProfile]] = {}
    for household, (owner, request) in requests.items():
        measured[household] = _owner_results(household, request, owner_replies.get(household))
    return measured


def _owner_results(household: str, request: LinkProbeRequest, reply: Message | None) -> dict[str, LinkProfile]:
    """Return the links that the owner's reply measured; log every peer without one at WARNING."""
    if reply is None or LINKS not in reply.content.config_records:
        logger.warning(
            "Household %s: data owner %s sent no link measurements; links to %s are not measured",
            household, request.owner, list(request.peers),
        )  # fmt: skip
        return {}
    record = reply.content.config_records[LINKS]
    try:
        results = decode_results(str(record["measurements"]))
    except (KeyError, ConfigError) as exc:
        logger.warning("Household %s: data owner %s sent invalid link measurements: %s", household, request.owner, exc)
        return {}
    security = "mutual TLS" if bool(record.get("tls", False)) else "plaintext TCP"
    links = {}
    for peer in request.peers:
        result = results.get(peer)
        if result is None or result.link is None:
            reason = result.error if result is not None else "no result"
            logger.warning("Household %s: link %s -> %s not measured: %s", household, request.owner, peer, reason)
            continue
        links[peer] = result.link
        logger.info(
            "Household %s: link %s -> %s over %s: %.3g MB/s, latency %.3g ms",
            household, request.owner, peer, security, result.link.bandwidth_bytes_per_second / 1e6,
            result.link.latency_seconds * 1e3,
        )  # fmt: skip
    return links


def with_measured_links(devices: Iterable[DeviceInfo], measured: Mapping[str, Mapping[str, LinkProfile]]) -> list[DeviceInfo]:
    """Return `devices` with each data owner's `measured_links` set from `measured`."""
    updated = []
    for device in devices:
        links = measured.get(device.household, {}) if device.holds_data else {}
        if links:
            device = dataclasses.replace(device, measured_links=tuple(sorted(links.items())))
        updated.append(device)
    return updated
