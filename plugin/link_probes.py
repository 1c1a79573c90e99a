"""The link probe step of discovery, as plain data that the server and the devices exchange.

After discovery the strategy has every device's data-plane address. It then
sends each household's devices one `LinkProbeRequest`. The pairing is fixed:
the data owner dials every other device of its household, one after the
other in the order of `peers` (sorted by name), and measures that link with
`homesplit.planner.linkprobe.measure_link`. The other devices listen on
their data-plane address and echo the owner's probes. The owner runs stage 0
of every plan, so every link that carries its activations is measured. Links
between two other devices are not measured, so `homesplit.profiled_plan`
estimates each from the owner's links to those two devices.

Deadlines: the owner spends at most `budget_seconds` on each peer, for
connecting and measuring. So peer ``i`` (1-based in `peers`) waits at most
``i * budget_seconds`` for the owner to connect, and the server waits for
the replies at least ``len(peers) * budget_seconds``.

The owner's reply maps each peer to its measured link or to the error that
stopped the measurement (`encode_results`, `decode_results`).
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from homesplit.errors import ConfigError
from homesplit.json_limits import loads_limited
from homesplit.planner.profiles import LinkProfile

__all__ = ["LinkProbeRequest", "ProbeResult", "decode_results", "encode_results"]

PROBE_KIND = "linkprobe"
"""Message kind in the names of rendezvous files for probe listeners on port 0."""


@dataclass(frozen=True)
class LinkProbeRequest:
    """Settings that every device of one household needs to run the link probe.

    Parameters
    ----------
    session : int
        Probe session, at least 1, unique within a run. Probe links use round
        ``-session`` in their HELLO frames, so a probe link never matches a
        training link, whose round is at least 1.
    owner : str
        Device name of the data owner, which dials every peer.
    peers : tuple of str
        The other devices, in the order the owner probes them.
    addresses : tuple of str
        Data-plane address (``HOST:PORT``) of each peer, in the order of `peers`.
    budget_seconds : float
        Seconds the owner may spend on one peer, connecting included.
    """

    session: int
    owner: str
    peers: tuple[str, ...]
    addresses: tuple[str, ...]
    budget_seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.session, bool) or not isinstance(self.session, int) or self.session < 1:
            raise ConfigError(f"link probe session={self.session!r} is invalid; it must be an integer of at least 1")
        if len(self.peers) != len(self.addresses):
            raise ConfigError(f"link probe has {len(self.peers)} peers but {len(self.addresses)} addresses; give one address per peer")
        if self.owner in self.peers:
            raise ConfigError(f"link probe lists the data owner {self.owner!r} among its peers {list(self.peers)}")
        if not (math.isfinite(self.budget_seconds) and self.budget_seconds > 0):
            raise ConfigError(f"link probe budget_seconds={self.budget_seconds!r} must be a positive, finite number of seconds")

    @property
    def round(self) -> int:
        """Round number of the probe links' HELLO frames: ``-session``."""
        return -self.session

    def stage_of(self, device: str) -> int:
        """Return the stage index that identifies `device` on a probe link: 0 for the owner, ``i`` for peer ``i``.

        Raises
        ------
        ConfigError
            If `device` is neither the owner nor a peer.
        """
        if device == self.owner:
            return 0
        if device not in self.peers:
            raise ConfigError(f"device {device!r} is not part of the link probe of {self.owner!r} and {list(self.peers)}")
        return self.peers.index(device) + 1

    def to_config(self) -> dict[str, Any]:
        """Return the request as the values of a Flower ConfigRecord."""
        return {
            "session": self.session,
            "owner": self.owner,
            "peers": json.dumps(list(self.peers)),
            "addresses": json.dumps(list(self.addresses)),
            "budget-seconds": float(self.budget_seconds),
        }

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> LinkProbeRequest:
        """Build a request from the values written by `to_config`.

        Raises
        ------
        ConfigError
            If a key is missing or has an invalid value.
        """
        try:
            peers = _string_list(record["peers"], key="peers")
            addresses = _string_list(record["addresses"], key="addresses")
            return cls(
                session=int(record["session"]),
                owner=str(record["owner"]),
                peers=peers,
                addresses=addresses,
                budget_seconds=float(record["budget-seconds"]),
            )
        except ConfigError:
            raise
        except KeyError as exc:
            raise ConfigError(f"link probe request lacks key {exc.args[0]!r}; the server and device versions differ") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"link probe request is invalid: {exc}") from None


def _string_list(value: Any, *, key: str) -> tuple[str, ...]:
    """Decode the JSON list of strings under `key` of a request's ConfigRecord."""
    try:
        items = loads_limited(str(value))
    except ValueError as exc:
        raise ConfigError(
            f"link probe request's {key} are not valid JSON ({exc}); check that the server runs the same homesplit "
            "version as this device"
        ) from None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"link probe request's {key}={reprlib.repr(items)} is invalid; allowed: a JSON list of strings")
    return tuple(items)


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of probing one peer: a measured link, or the error that stopped it."""

    link: LinkProfile | None = None
    error: str | None = None


def encode_results(results: Mapping[str, ProbeResult]) -> str:
    """Encode the owner's results per peer as JSON, for its reply."""
    encoded = {}
    for peer, result in results.items():
        encoded[peer] = result.link.to_dict() if result.link is not None else {"error": str(result.error)}
    return json.dumps(encoded, sort_keys=True)


def decode_results(text: str) -> dict[str, ProbeResult]:
    """Decode the output of `encode_results`.

    A peer whose entry is not a valid link becomes a `ProbeResult` with an
    error that names the invalid entry.

    Raises
    ------
    ConfigError
        If `text` is not a JSON object.
    """
    try:
        raw = loads_limited(text)
    except ValueError as exc:
        raise ConfigError(f"link probe results are not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"link probe results must be a JSON object of peers, not {type(raw).__name__}")
    results = {}
    for peer, entry in raw.items():
        if isinstance(entry, dict) and "error" in entry:
            results[str(peer)] = ProbeResult(error=str(entry["error"]))
            continue
        try:
            link = LinkProfile(
                bandwidth_bytes_per_second=float(entry["bandwidth_bytes_per_second"]),
                latency_seconds=float(entry["latency_seconds"]),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            results[str(peer)] = ProbeResult(error=f"invalid measurement {reprlib.repr(entry)}: {exc}")
            continue
        results[str(peer)] = ProbeResult(link=link)
    return results
