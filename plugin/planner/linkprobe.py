"""Measure the bandwidth and latency of a data-plane link as a `LinkProfile`.

The measuring side sends probe frames and the peer echoes each one back, so
every round trip carries the payload both ways, as a micro-batch's activation
and its gradient cross a cut. With ``r(n)`` the median round trip of an
``n``-byte probe:

- latency = ``(r(small) - small / bandwidth) / 2``, the one-way time of an
  empty frame;
- bandwidth = ``2 * (large - small) / (r(large) - r(small))``, in bytes per
  second, because the payload difference crosses the link twice.

Both figures include what the runtime pays per frame (header encoding, the
sender and receiver threads, copies), which is what the planner's transfer
time has to predict. The probes run over any `Link`: plaintext TCP on
loopback in tests, mutual TLS between devices.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time

import torch

from homesplit.errors import ConfigError, LinkError, PeerTimeoutError
from homesplit.link import Link
from homesplit.planner.profiles import LinkProfile
from homesplit.wire import Frame, FrameKind

__all__ = ["measure_link", "echo_link_probes", "measure_link_pair"]

logger = logging.getLogger(__name__)

# Probes are ACTIVATION frames, and echoes are GRADIENT frames. A METRIC frame
# ends the probing, and `step` carries each probe's sequence number.
_PROBE = FrameKind.ACTIVATION
_ECHO = FrameKind.GRADIENT
_DONE = FrameKind.METRIC


def measure_link(
    link: Link,
    *,
    small_bytes: int = 64,
    large_bytes: int = 1 << 20,
    repeats: int = 9,
    timeout: float = 30.0,
    deadline: float | None = None,
) -> LinkProfile:
    """Measure `link` against a peer that runs `echo_link_probes`.

    Parameters
    ----------
    link : Link
        A connected link whose peer echoes probes.
    small_bytes : int, default 64
        Payload of the latency probes, in bytes.
    large_bytes : int, default 1 MiB
        Payload of the bandwidth probes, in bytes; larger than `small_bytes`.
    repeats : int, default 9
        Timed round trips per probe size, after one untimed round trip each.
    timeout : float, default 30.0
        Deadline for each echo, in seconds.
    deadline : float or None, default None
        `time.monotonic` time by which the whole measurement must end; None
        bounds each echo by `timeout` only.

    Returns
    -------
    LinkProfile
        The measured bandwidth and latency; the same figures describe both
        directions.

    Raises
    ------
    ConfigError
        If a size or the repeat count is invalid.
    LinkError
        If the peer does not echo a probe in time, or echoes the wrong one.
        A `PeerTimeoutError` when `deadline` passes.
    """
    if not 0 < small_bytes < large_bytes:
        raise ConfigError(
            f"invalid probe sizes small_bytes={small_bytes}, large_bytes={large_bytes}; "
            "small_bytes must be positive and below large_bytes"
        )
    if repeats < 1:
        raise ConfigError(f"repeats={repeats} must be at least 1")

    sequence = 0
    medians = {}
    try:
        for size in (small_bytes, large_bytes):
            payload = torch.zeros(size, dtype=torch.uint8)
            trips = []
            for index in range(repeats + 1):
                start = time.perf_counter()
                _round_trip(link, payload, sequence, _echo_wait(link, timeout, deadline))
                if index > 0:
                    trips.append(time.perf_counter() - start)
                sequence += 1
            medians[size] = statistics.median(trips)
    finally:
        link.send(Frame(_DONE, torch.zeros(1, dtype=torch.float64)))

    extra = medians[large_bytes] - medians[small_bytes]
    if extra > 0:
        bandwidth = 2 * (large_bytes - small_bytes) / extra
    else:
        # Noise made the large probe look no slower than the small one. The
        # whole round trip of the large probe gives a lower bound instead.
        logger.warning("link to %s: large probes were not slower than small ones; bandwidth is a lower bound", link.peer)
        bandwidth = 2 * large_bytes / medians[large_bytes]
    latency = max(0.0, (medians[small_bytes] - small_bytes / bandwidth) / 2)
    logger.info(
        "link to %s: %.3g MB/s, latency %.3g ms (round trips %.3g ms at %d bytes, %.3g ms at %d bytes)",
        link.peer,
        bandwidth / 1e6,
        latency * 1e3,
        medians[small_bytes] * 1e3,
        small_bytes,
        medians[large_bytes] * 1e3,
        large_bytes,
    )
    return LinkProfile(bandwidth_bytes_per_second=bandwidth, latency_seconds=latency)


def echo_link_probes(link: Link, *, timeout: float = 30.0, max_probes: int = 10_000) -> int:
    """Echo the probes of a peer that runs `measure_link`, until it is done.

    Parameters
    ----------
    link : Link
        A connected link whose peer measures it.
    timeout : float, default 30.0
        Deadline for each probe, in seconds.
    max_probes : int, default 10000
        Probes to echo at most before giving up on the peer.

    Returns
    -------
    int
        The number of probes echoed.

    Raises
    ------
    LinkError
        If no probe arrives in time, the peer sends another kind of frame,
        or it sends more than `max_probes` probes.
    """
    for count in range(max_probes + 1):
        frame = link.recv(timeout=timeout)
        if frame.kind is _DONE:
            return count
        if frame.kind is not _PROBE:
            raise LinkError(f"expected a link probe from {link.peer}, got a {frame.kind.name} frame", peer=link.peer)
        link.send(Frame(_ECHO, frame.tensor, step=frame.step))
    raise LinkError(f"{link.peer} sent more than max_probes={max_probes} link probes", peer=link.peer)


def measure_link_pair(measuring: Link, echoing: Link, *, timeout: float = 30.0, **options: int) -> LinkProfile:
    """Measure two ends of one link that live in this process, echoing in a thread.

    This is for loopback links in tests and benchmarks. `options` are passed
    to `measure_link`.
    """
    errors: list[BaseException] = []

    def echo() -> None:
        try:
            echo_link_probes(echoing, timeout=timeout)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)

    thread = threading.Thread(target=echo, name="homesplit-link-echo", daemon=True)
    thread.start()
    try:
        profile = measure_link(measuring, timeout=timeout, **options)
    finally:
        thread.join(timeout)
    if thread.is_alive():
        raise LinkError(f"the echo side of {measuring.peer} did not stop within {timeout} s", peer=measuring.peer)
    if errors:
        raise errors[0]
    return profile


def _echo_wait(link: Link, timeout: float, deadline: float | None) -> float:
    """Return how long to wait for the next echo: `timeout`, cut short by `deadline`."""
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise PeerTimeoutError(f"measuring the link to {link.peer} did not finish before its deadline", peer=link.peer)
    return min(timeout, remaining)


def _round_trip(link: Link, payload: torch.Tensor, sequence: int, timeout: float) -> None:
    link.send(Frame(_PROBE, payload, step=sequence))
    echo = link.recv(timeout=timeout)
    if echo.kind is not _ECHO or echo.step != sequence:
        raise LinkError(
            f"expected the echo of link probe {sequence} from {link.peer}, got a {echo.kind.name} frame "
            f"for probe {echo.step}",
            peer=link.peer,
        )
