"""Connection set-up between neighbouring stages.

The downstream stage listens and the upstream stage dials, because the data
owner (stage 0) is then the only device that never accepts connections. Each
link is two TCP connections, one per direction (see `homesplit.link`). Both
start with a HELLO frame in each direction that names the sender's device,
stage, round and a session token, so that a connection left over from another
round, or meant for another stage, is rejected before any tensor flows.

`TcpTransport` trusts what HELLO claims and is meant for loopback. The TLS
transport in `homesplit.tls` overrides the socket hooks so that identities come
from certificates instead.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from homesplit.errors import ConfigError, FrameError, LinkError, PeerRejectedError, PeerTimeoutError
from homesplit.link import LinkTimeouts, SocketLink, read_frame, write_frame
from homesplit.wire import Frame, FrameKind, FrameLimits

__all__ = ["PeerIdentity", "TcpTransport", "parse_address", "open_listener"]

logger = logging.getLogger(__name__)

_HELLO_LIMITS = FrameLimits(max_payload_bytes=4096, max_ndim=1, max_parts=1)
_HANDSHAKE_SECONDS = 10.0
# Handshakes that the listener runs at once. Further connections wait in the
# kernel's listen backlog until a handshake ends, so a flood of idle
# connections costs a bounded number of threads.
_MAX_HANDSHAKES = 16
# Longest wait for one listener.accept call, so the accept loop collects
# finished handshakes at least this often.
_ACCEPT_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class PeerIdentity:
    """Identity of a stage: the facts that HELLO frames carry and verify.

    Parameters
    ----------
    device : str
        Device name, as in its certificate when TLS is used.
    stage : int
        Pipeline stage index held by the device.
    household : str, default "local"
        Household id.
    round : int, default 0
        Federated round; links of different rounds never mix.
    """

    device: str
    stage: int
    household: str = "local"
    round: int = 0

    def describe(self) -> str:
        """Return a short human-readable name for errors."""
        return f"{self.household}/{self.device} (stage {self.stage})"


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT`` into host and port.

    Raises
    ------
    ConfigError
        If the address has no valid port.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"address {address!r} is not HOST:PORT; write it like 127.0.0.1:9100 or [::1]:9100")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"address {address!r} has port {port_text!r}, which is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"address {address!r} has port {port}, outside 0..65535")
    return host, port


def open_listener(address: str) -> socket.socket:
    """Open a listening TCP socket.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` to bind (port 0 picks a free port), or ``fd:N`` to adopt
        an inherited listening socket, which lets a parent process choose
        ports without a race.
    """
    if address.startswith("fd:"):
        fd = int(address[3:])
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        return sock
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    return sock


def _tune(sock: socket.socket) -> None:
    # Without TCP_NODELAY, Nagle's algorithm delays small frames by tens of ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _hello_payload(local: PeerIdentity, channel: str, session: str) -> str:
    return json.dumps(
        {
            "device": local.device,
            "stage": local.stage,
            "household": local.household,
            "round": local.round,
            "channel": channel,
            "session": session,
        }
    )


def _parse_hello(frame: Frame, peer: str) -> dict:
    if frame.kind is not FrameKind.HELLO:
        raise PeerRejectedError(f"{peer} sent a {frame.kind.name} frame before HELLO", peer=peer)
    try:
        hello = json.loads(frame.as_text())
    except (json.JSONDecodeError, RecursionError):
        # A 4 KiB payload of "[" nests deeper than the JSON decoder's recursion limit.
        raise PeerRejectedError(f"{peer} sent a HELLO that is not JSON", peer=peer) from None
    if not isinstance(hello, dict):
        raise PeerRejectedError(f"{peer} sent a HELLO that is not a JSON object", peer=peer)
    for key, kind in _HELLO_TYPES.items():
        value = hello.get(key)
        # bool is a subclass of int, and True == 1 would pass the identity check.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PeerRejectedError(
                f"{peer} sent a HELLO whose {key!r} is {_short_repr(value)}, not a {kind.__name__}", peer=peer
            )
    return hello


_HELLO_TYPES = {"device": str, "stage": int, "household": str, "round": int, "channel": str, "session": str}


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


class TcpTransport:
    """Plaintext TCP links; identities are claimed, not proven.

    Use it on loopback for tests and benchmarks. Between devices use
    `homesplit.tls.TlsTransport`, which has the same methods.

    Parameters
    ----------
    limits : FrameLimits, optional
        Header limits applied to every received frame.
    timeouts : LinkTimeouts, optional
        Connection, receive and liveness deadlines.
    """

    def __init__(self, *, limits: FrameLimits | None = None, timeouts: LinkTimeouts | None = None) -> None:
        self.limits = limits or FrameLimits()
        self.timeouts = timeouts or LinkTimeouts()

    def _client_socket(self, sock: socket.socket, expect: PeerIdentity) -> socket.socket:
        """Hook: secure a dialed socket before HELLO. Plain TCP returns it as is."""
        return sock

    def _server_socket(self, sock: socket.socket) -> socket.socket:
        """Hook: secure an accepted socket before HELLO. Plain TCP returns it as is."""
        return sock

    def _proven_device(self, sock: socket.socket) -> str | None:
        """Hook: the device name the peer proved, or None if nothing is proven."""
        return None

    def _check_hello(self, sock: socket.socket, hello: dict, expect: PeerIdentity, peer: str) -> None:
        proven = self._proven_device(sock)
        claimed = hello.get("device")
        if proven is not None and claimed != proven:
            raise PeerRejectedError(f"{peer} proved device {proven!r} but its HELLO claims {claimed!r}", peer=peer)
        actual = (claimed, hello.get("stage"), hello.get("household"), hello.get("round"))
        expected = (expect.device, expect.stage, expect.household, expect.round)
        if actual != expected:
            raise PeerRejectedError(
                f"{peer} is device={actual[0]!r} stage={actual[1]!r} household={actual[2]!r} round={actual[3]!r}, "
                f"but the plan expects {expect.describe()} in round {expect.round}",
                peer=peer,
            )

    def dial(self, address: str, *, local: PeerIdentity, expect: PeerIdentity) -> SocketLink:
        """Connect to the downstream stage listening at `address`.

        Retries refused connections until `timeouts.connect` expires, since
        the peer may still be starting.

        Raises
        ------
        PeerTimeoutError
            If the peer does not accept in time.
        PeerRejectedError
            If the peer is not the expected device, stage, household or round.
        """
        deadline = time.monotonic() + self.timeouts.connect
        session = secrets.token_hex(8)
        down = self._dial_channel(address, local, expect, "down", session, deadline)
        try:
            up = self._dial_channel(address, local, expect, "up", session, deadline)
        except BaseException:
            down.close()
            raise
        logger.debug("Connected to %s at %s", expect.describe(), address)
        return SocketLink(down, up, peer=f"{expect.device}@{address}", limits=self.limits, timeouts=self.timeouts)

    def _dial_channel(
        self, address: str, local: PeerIdentity, expect: PeerIdentity, channel: str, session: str, deadline: float
    ) -> socket.socket:
        host, port = parse_address(address)
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerTimeoutError(
                    f"could not connect to {expect.describe()} at {address} within {self.timeouts.connect} s; "
                    "check that the device is running and the address is right",
                    peer=address,
                )
            try:
                raw = socket.create_connection((host, port), timeout=min(remaining, _HANDSHAKE_SECONDS))
            except (ConnectionRefusedError, ConnectionResetError, socket.timeout, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (None, 111, 104, 110, 113, 99):
                    raise
                time.sleep(min(delay, max(remaining, 0)))
                delay = min(delay * 2, 1.0)
                continue
            break
        _tune(raw)
        peer = f"{expect.device}@{address}"
        sock = raw
        # The peer may still be starting and not yet accepting, so the dialer
        # waits for its handshake until the connect deadline, not a fixed time.
        raw.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            sock = self._client_socket(raw, expect)
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            write_frame(sock, Frame.text(FrameKind.HELLO, _hello_payload(local, channel, session)))
            reply, _ = read_frame(sock, _HELLO_LIMITS, peer=peer, deadline=deadline)
            self._check_hello(sock, _parse_hello(reply, peer), expect, peer)
            sock.settimeout(None)
            return sock
        except (OSError, FrameError, LinkError) as exc:
            # A TLS hook detaches `raw`, so the wrapped socket must be closed too.
            sock.close()
            raw.close()
            if isinstance(exc, LinkError):
                raise
            raise PeerRejectedError(f"handshake with {peer} failed: {exc}", peer=peer) from exc

    def accept(self, listener: socket.socket, *, local: PeerIdentity, expect: PeerIdentity) -> SocketLink:
        """Accept the upstream stage's two connections on `listener`.

        Connections from anyone other than the expected peer are rejected with
        one log line each, and the listener keeps waiting for the right peer
        until `timeouts.connect` expires.

        Raises
        ------
        PeerTimeoutError
            If the expected peer has not connected in time.
        """
        deadline = time.monotonic() + self.timeouts.connect
        channels: dict[str, socket.socket] = {}
        session: str | None = None
        handshakes = _Handshakes(lambda raw, peer_addr: self._accept_one(raw, peer_addr, local, expect, deadline))
        try:
            while len(channels) < 2:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerTimeoutError(
                        f"{expect.describe()} did not connect within {self.timeouts.connect} s",
                        peer=expect.device,
                    )
                accepted = handshakes.next_result()
                if accepted is None:
                    self._accept_pending(listener, handshakes, min(remaining, _ACCEPT_POLL_SECONDS))
                    continue
                sock, hello = accepted
                if session is None:
                    session = hello.get("session")
                if hello.get("session") != session or hello.get("channel") in channels:
                    # A stale half-open attempt by the same device: keep the newest.
                    for old in channels.values():
                        old.close()
                    channels.clear()
                    session = hello.get("session")
                channels[hello["channel"]] = sock
        except BaseException:
            for sock in channels.values():
                sock.close()
            raise
        finally:
            handshakes.close()
        logger.debug("Accepted %s", expect.describe())
        return SocketLink(
            channels["up"], channels["down"], peer=f"{expect.device}", limits=self.limits, timeouts=self.timeouts
        )

    @staticmethod
    def _accept_pending(listener: socket.socket, handshakes: _Handshakes, wait: float) -> None:
        """Accept one connection within `wait` seconds and start its handshake, if a slot is free."""
        if handshakes.full():
            time.sleep(wait)
            return
        listener.settimeout(wait)
        try:
            raw, addr = listener.accept()
        except socket.timeout:
            return
        handshakes.start(raw, _format_address(addr))

    def _accept_one(
        self, raw: socket.socket, peer_addr: str, local: PeerIdentity, expect: PeerIdentity, deadline: float
    ) -> tuple[socket.socket, dict] | None:
        # One handshake may take at most _HANDSHAKE_SECONDS in total, however
        # slowly the peer sends, and never past the accept deadline.
        handshake_deadline = min(time.monotonic() + _HANDSHAKE_SECONDS, deadline)
        _tune(raw)
        raw.settimeout(max(handshake_deadline - time.monotonic(), 0.1))
        sock = raw
        try:
            sock = self._server_socket(raw)
            frame, _ = read_frame(sock, _HELLO_LIMITS, peer=peer_addr, deadline=handshake_deadline)
            hello = _parse_hello(frame, peer_addr)
            self._check_hello(sock, hello, expect, peer_addr)
            if hello.get("channel") not in ("up", "down") or not isinstance(hello.get("session"), str):
                raise PeerRejectedError(f"{peer_addr} sent a HELLO without a valid channel and session", peer=peer_addr)
            write_frame(sock, Frame.text(FrameKind.HELLO, _hello_payload(local, hello["channel"], hello["session"])))
            sock.settimeout(None)
            return sock, hello
        except (OSError, FrameError, LinkError) as exc:
            logger.warning("Rejected connection from %s: %s", peer_addr, _reason(exc))
            for opened in (sock, raw):
                try:
                    opened.close()
                except OSError:
                    pass
            return None


class _Handshakes:
    """Server-side handshakes of accepted connections, each in its own thread.

    A connection that sends its HELLO slowly, or never, then holds up only its
    own thread, and the listener keeps accepting the expected peer.

    Parameters
    ----------
    handshake : callable
        ``handshake(raw, peer_addr)`` returns ``(socket, hello)`` or None if
        it rejected the connection. It must end by its own deadline.
    """

    def __init__(self, handshake: Callable[[socket.socket, str], tuple[socket.socket, dict] | None]) -> None:
        self._handshake = handshake
        self._results: queue.Queue[tuple[socket.socket, dict]] = queue.Queue()
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False

    def full(self) -> bool:
        """Return True if `_MAX_HANDSHAKES` handshakes are running."""
        with self._lock:
            return self._running >= _MAX_HANDSHAKES

    def start(self, raw: socket.socket, peer_addr: str) -> None:
        """Run the handshake of the accepted socket `raw` in a new thread."""
        with self._lock:
            self._running += 1
        thread = threading.Thread(target=self._run, args=(raw, peer_addr), name=f"homesplit-hello-{peer_addr}", daemon=True)
        thread.start()

    def next_result(self) -> tuple[socket.socket, dict] | None:
        """Return a completed handshake, or None if none has completed yet."""
        try:
            return self._results.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        """Close every completed handshake not taken, and those that complete later."""
        with self._lock:
            self._closed = True
        while (accepted := self.next_result()) is not None:
            accepted[0].close()

    def _run(self, raw: socket.socket, peer_addr: str) -> None:
        accepted = None
        try:
            accepted = self._handshake(raw, peer_addr)
        except Exception:
            logger.exception("Handshake with %s failed unexpectedly", peer_addr)
            raw.close()
        finally:
            with self._lock:
                self._running -= 1
                keep = accepted is not None and not self._closed
                if keep:
                    self._results.put(accepted)
            if accepted is not None and not keep:
                accepted[0].close()


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _format_address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def inherit_listener_fd(sock: socket.socket) -> str:
    """Mark `sock` inheritable and return the ``fd:N`` address a child process can adopt."""
    os.set_inheritable(sock.fileno(), True)
    return f"fd:{sock.fileno()}"
