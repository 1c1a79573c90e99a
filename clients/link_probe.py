"""The device side of the link probe: the data owner measures, every other device echoes.

`homesplit.link_probes` describes the pairing and the deadlines. Links use
the household transport that training uses (`device_transport`): mutual TLS
1.3 with the device bundle, so only devices of the same household connect,
or plaintext TCP when the node config sets ``insecure-links=true``.
"""

from __future__ import annotations

import logging
import time

from homesplit.clients.node import DeviceConfig
from homesplit.clients.rendezvous import publish_port, wait_for_port
from homesplit.clients.stage_round import device_transport
from homesplit.errors import HomesplitError
from homesplit.link import LinkTimeouts
from homesplit.link_probes import PROBE_KIND, LinkProbeRequest, ProbeResult
from homesplit.planner.linkprobe import echo_link_probes, measure_link
from homesplit.planner.profiles import LinkProfile
from homesplit.transport import PeerIdentity, open_listener, parse_address

__all__ = ["measure_peers", "echo_owner"]

logger = logging.getLogger(__name__)

# Fewer round trips than measure_link's default, because discovery waits for
# every probe: 5 timed round trips per size still give a median.
_REPEATS = 5


def measure_peers(device: DeviceConfig, request: LinkProbeRequest) -> dict[str, ProbeResult]:
    """Measure the link from the data owner to each peer in turn; run on the data owner.

    A peer that cannot be reached or measured within `request.budget_seconds`
    gets a `ProbeResult` with the error, logged at WARNING, and the owner
    moves on to the next peer.
    """
    if device.device != request.owner:
        raise HomesplitError(f"{device.household}/{device.device} received a request to measure links, but only the data owner {request.owner} measures them")
    results: dict[str, ProbeResult] = {}
    local = PeerIdentity(device.device, 0, device.household, request.round)
    for index, (peer, address) in enumerate(zip(request.peers, request.addresses), start=1):
        deadline = time.monotonic() + request.budget_seconds
        try:
            results[peer] = ProbeResult(link=_measure_one(device, request, local, index, peer, address, deadline))
        except HomesplitError as exc:
            logger.warning("%s/%s: measuring the link to %s failed: %s", device.household, device.device, peer, exc)
            results[peer] = ProbeResult(error=f"{type(exc).__name__}: {exc}")
    return results


def _measure_one(
    device: DeviceConfig, request: LinkProbeRequest, local: PeerIdentity, index: int, peer: str, address: str, deadline: float
) -> LinkProfile:
    remaining = max(deadline - time.monotonic(), 0.1)
    host, port = parse_address(address)
    if port == 0:
        port = wait_for_port(device.rendezvous_dir, device.household, PROBE_KIND, request.session, index, timeout=remaining)
        address = f"{host}:{port}"
    transport = device_transport(device, _timeouts(max(deadline - time.monotonic(), 0.1)))
    link = transport.dial(address, local=local, expect=PeerIdentity(peer, index, device.household, request.round))
    try:
        measured = measure_link(link, repeats=_REPEATS, timeout=request.budget_seconds, deadline=deadline)
    finally:
        link.close()
    return measured


def echo_owner(device: DeviceConfig, request: LinkProbeRequest) -> int:
    """Accept the data owner on this device's data-plane address and echo its probes; return the probes echoed.

    Peer ``i`` waits at most ``i * request.budget_seconds`` for the owner,
    who probes the peers before it first.

    Raises
    ------
    LinkError
        If the owner does not connect in time, is not the expected device of
        this household (TLS), or stops echoing midway.
    """
    index = request.stage_of(device.device)
    if index == 0:
        raise HomesplitError(f"{device.household}/{device.device} is the data owner; it measures links, it does not echo")
    timeouts = _timeouts(index * request.budget_seconds)
    transport = device_transport(device, timeouts)
    listener = open_listener(device.listen)
    try:
        if parse_address(device.listen)[1] == 0:
            port = listener.getsockname()[1]
            publish_port(device.rendezvous_dir, device.household, PROBE_KIND, request.session, index, port)
        local = PeerIdentity(device.device, index, device.household, request.round)
        expect = PeerIdentity(request.owner, 0, device.household, request.round)
        link = transport.accept(listener, local=local, expect=expect)
    finally:
        listener.close()
    try:
        count = echo_link_probes(link, timeout=request.budget_seconds)
    finally:
        link.close()
    logger.info("%s/%s: echoed %d link probes of %s", device.household, device.device, count, request.owner)
    return count


def _timeouts(connect: float) -> LinkTimeouts:
    """Return link deadlines for a probe: `connect` seconds to connect, the default liveness checks."""
    return LinkTimeouts(connect=connect)
