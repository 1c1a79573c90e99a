"""A stalled peer makes read_frame and SocketLink raise PeerTimeoutError, on real loopback sockets.

Each case sends part of a frame and then nothing, over plain TCP, over
`TlsStream` and over `ssl.SSLSocket`, and the reader must time out with an
error that names the peer and how many bytes of the frame arrived. A peer
whose bytes keep arriving, however slowly, must not count as silent.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from socket_support import run_in_thread, tcp_pair

from homesplit.bundle import DeviceBundle
from homesplit.errors import PeerTimeoutError
from homesplit.link import LinkTimeouts, SocketLink, read_frame
from homesplit.pki import Household
from homesplit.tls import client_context, server_context
from homesplit.tls_stream import TlsStream
from homesplit.wire import DTYPE_CODES, HEADER, MAGIC, VERSION, FrameKind, FrameLimits

STALL_SECONDS = 0.25
WAIT_SECONDS = 5.0
PEER = "phone@127.0.0.1"

# A float32 frame of shape (16,): the fixed header, one 8-byte shape entry, 64 payload bytes.
FIXED = HEADER.pack(MAGIC, VERSION, int(FrameKind.ACTIVATION), DTYPE_CODES[torch.float32], 1, 0, 0, 0, 0, 1, 64)
SHAPE = struct.pack("<Q", 16)

# Part of the frame the peer stalls in -> (bytes it sends before it stalls,
# progress text that the timeout error must contain).
STALLS = {
    "header": (FIXED[:5], f"5 of {HEADER.size} bytes of its header"),
    "payload": (FIXED + SHAPE + b"\0" * 10, "10 of 64 bytes of its payload"),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DeviceBundle]:
    root = tmp_path_factory.mktemp("household")
    household = Household.create(root / "ca", "smith")
    return {device: DeviceBundle.from_dir(household.enroll(device, out=root / device)[1]) for device in ("phone", "laptop")}


def _handshake_pair(server_side, client_side) -> tuple[object, object]:
    """Run the server handshake in a thread and the client handshake here, and return (client, server)."""
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.setdefault("server", server_side()), daemon=True)
    thread.start()
    client = client_side()
    thread.join(timeout=WAIT_SECONDS)
    assert "server" in result, f"server handshake failed or did not finish within {WAIT_SECONDS} s"
    return client, result["server"]


def _connect(kind: str, bundles: dict[str, DeviceBundle]) -> tuple[object, object]:
    """Return (sender, receiver) connected over `kind`, with the phone as sender and the laptop as receiver."""
    dialed, accepted = tcp_pair()
    if kind == "tcp":
        return dialed, accepted
    dialed.settimeout(WAIT_SECONDS)
    accepted.settimeout(WAIT_SECONDS)
    if kind == "tls_stream":
        sender, receiver = _handshake_pair(
            lambda: TlsStream.handshake(accepted, server_context(bundles["laptop"]), server_side=True),
            lambda: TlsStream.handshake(dialed, client_context(bundles["phone"]), server_side=False),
        )
    else:
        sender, receiver = _handshake_pair(
            lambda: server_context(bundles["laptop"]).wrap_socket(accepted, server_side=True),
            lambda: client_context(bundles["phone"]).wrap_socket(dialed),
        )
    sender.settimeout(None)
    receiver.settimeout(None)
    return sender, receiver


@pytest.fixture(params=["tcp", "tls_stream", "ssl_socket"])
def connection(request: pytest.FixtureRequest, bundles: dict[str, DeviceBundle]) -> Iterator[tuple[object, object]]:
    sender, receiver = _connect(request.param, bundles)
    yield sender, receiver
    sender.close()
    receiver.close()


@contextmanager
def _open_link(
    kind: str, bundles: dict[str, DeviceBundle], timeouts: LinkTimeouts, *, inbound_timeout: float | None = None
) -> Iterator[tuple[object, SocketLink]]:
    """Open a SocketLink that reads what the phone sends over `kind`, and yield (sender, link).

    SocketLink needs separate outbound and inbound sockets for TLS, because an
    OpenSSL connection must not be read and written from two threads at once.
    So the link's heartbeats go to a socket pair that the test never reads.
    """
    sender, inbound = _connect(kind, bundles)
    outbound, sink = socket.socketpair()
    inbound.settimeout(inbound_timeout)
    link = SocketLink(outbound, inbound, peer=PEER, timeouts=timeouts)
    try:
        yield sender, link
    finally:
        link.close()
        sender.close()
        sink.close()


@pytest.mark.parametrize("limit", ["socket_timeout", "deadline"])
@pytest.mark.parametrize("stall", list(STALLS))
def test_read_frame_stall_raises_peer_timeout(connection, stall: str, limit: str) -> None:
    sender, receiver = connection
    data, progress = STALLS[stall]
    sender.sendall(data)

    if limit == "socket_timeout":
        receiver.settimeout(STALL_SECONDS)
        deadline = None
    else:
        deadline = time.monotonic() + STALL_SECONDS
    started = time.monotonic()
    outcome = run_in_thread(lambda: read_frame(receiver, FrameLimits(), peer=PEER, deadline=deadline), wait=WAIT_SECONDS)
    seconds = time.monotonic() - started

    assert isinstance(outcome, PeerTimeoutError), repr(outcome)
    assert outcome.peer == PEER
    assert PEER in str(outcome)
    assert progress in str(outcome)
    assert seconds >= STALL_SECONDS * 0.9


@pytest.mark.parametrize("kind", ["tcp", "tls_stream"])
def test_link_stalled_inbound_raises_peer_timeout(kind: str, bundles: dict[str, DeviceBundle]) -> None:
    timeouts = LinkTimeouts(connect=WAIT_SECONDS, recv=WAIT_SECONDS, peer_silence=WAIT_SECONDS, heartbeat=1.0)
    with _open_link(kind, bundles, timeouts, inbound_timeout=STALL_SECONDS) as (sender, link):
        sender.sendall(STALLS["payload"][0])
        with pytest.raises(PeerTimeoutError) as raised:
            link.recv(timeout=WAIT_SECONDS)
        # The reader failed the link, so a later recv raises the same error at once.
        with pytest.raises(PeerTimeoutError):
            link.recv(timeout=WAIT_SECONDS)

    assert raised.value.peer == PEER
    assert STALLS["payload"][1] in str(raised.value)


@pytest.mark.parametrize("kind", ["tcp", "tls_stream"])
def test_link_slow_frame_is_not_silence(kind: str, bundles: dict[str, DeviceBundle]) -> None:
    # The peer sends one frame in pieces over twice `peer_silence`. Bytes
    # keep arriving, so the peer is slow, not silent, and the frame must come
    # through whole.
    timeouts = LinkTimeouts(connect=WAIT_SECONDS, recv=WAIT_SECONDS, peer_silence=STALL_SECONDS * 2, heartbeat=STALL_SECONDS)
    payload = torch.arange(16, dtype=torch.float32)
    data = FIXED + SHAPE + payload.numpy().tobytes()
    pieces = [data[start : start + 8] for start in range(0, len(data), 8)]
    pause = timeouts.peer_silence * 2 / len(pieces)

    with _open_link(kind, bundles, timeouts) as (sender, link):

        def trickle() -> None:
            for piece in pieces:
                sender.sendall(piece)
                time.sleep(pause)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            frame = link.recv(timeout=WAIT_SECONDS)
        finally:
            thread.join(timeout=WAIT_SECONDS)

    assert not thread.is_alive(), f"sender still running after {WAIT_SECONDS} s"
    assert frame.kind is FrameKind.ACTIVATION
    assert torch.equal(frame.tensor, payload)


@pytest.mark.parametrize("kind", ["tcp", "tls_stream"])
def test_link_returns_frame_before_silence(kind: str, bundles: dict[str, DeviceBundle]) -> None:
    # The peer sends one whole frame and then nothing, and the test calls
    # recv only after twice `peer_silence`. The frame arrived, so recv must
    # return it, and only the next recv raises for the silence.
    timeouts = LinkTimeouts(connect=WAIT_SECONDS, recv=WAIT_SECONDS, peer_silence=STALL_SECONDS * 2, heartbeat=STALL_SECONDS)
    payload = torch.arange(16, dtype=torch.float32)
    with _open_link(kind, bundles, timeouts) as (sender, link):
        sender.sendall(FIXED + SHAPE + payload.numpy().tobytes())
        time.sleep(timeouts.peer_silence * 2)
        frame = link.recv(timeout=WAIT_SECONDS)
        with pytest.raises(PeerTimeoutError) as raised:
            link.recv(timeout=WAIT_SECONDS)

    assert torch.equal(frame.tensor, payload)
    assert "sent nothing" in str(raised.value)
