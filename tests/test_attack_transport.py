"""Hostile peers against the HELLO handshake and the accept loop, on loopback.

Each test opens a bad connection to a listening stage, then lets the expected
peer dial, and checks that the listener still accepts it before its deadline.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from homesplit.errors import PeerAbortedError, PeerClosedError, PeerTimeoutError
from homesplit.link import LinkTimeouts, SocketLink, read_frame, write_frame
from homesplit.pki import Household
from homesplit.tls import TlsTransport
from homesplit.transport import PeerIdentity, TcpTransport, open_listener
from homesplit.wire import Frame, FrameKind, FrameLimits, encode_header

UPSTREAM = PeerIdentity("phone", 0, "smith")
DOWNSTREAM = PeerIdentity("laptop", 1, "smith")
CONNECT_SECONDS = 6.0


class AcceptThread:
    """`transport.accept` of the downstream stage, run in a background thread."""

    def __init__(self, transport: TcpTransport) -> None:
        self.listener = open_listener("127.0.0.1:0")
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.transport = transport
        self.link: SocketLink | None = None
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.link = self.transport.accept(self.listener, local=DOWNSTREAM, expect=UPSTREAM)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc
        self.seconds = time.monotonic() - started

    def join(self) -> None:
        self.thread.join(timeout=CONNECT_SECONDS + 10)
        self.listener.close()
        if self.link is not None:
            self.link.close()


def _tcp() -> TcpTransport:
    return TcpTransport(timeouts=LinkTimeouts(connect=CONNECT_SECONDS))


def _hello_frame(payload: bytes, dtype: torch.dtype = torch.uint8) -> Frame:
    return Frame(FrameKind.HELLO, torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype))


def _hello_json(**changes: object) -> bytes:
    hello = {"device": "phone", "stage": 0, "household": "smith", "round": 0, "channel": "up", "session": "s"}
    hello.update(changes)
    return json.dumps(hello).encode()


def _dial_expected(transport: TcpTransport, address: str) -> None:
    link = transport.dial(address, local=UPSTREAM, expect=DOWNSTREAM)
    link.close()


@pytest.mark.parametrize(
    "case, frame",
    [
        ("bfloat16 payload", _hello_frame(b'{"device": 12}', torch.bfloat16)),
        ("deeply nested json", _hello_frame(b"[" * 4000)),
        ("not json", _hello_frame(b"\xff\xfe not json")),
    ],
)
def test_bad_hello_keeps_listener_serving(case: str, frame: Frame) -> None:
    accepting = AcceptThread(_tcp())
    with socket.create_connection(("127.0.0.1", accepting.port), timeout=5) as attacker:
        write_frame(attacker, frame)
        _dial_expected(_tcp(), accepting.address)
        accepting.join()
    assert accepting.error is None, f"{case}: {accepting.error!r}"
    assert accepting.link is not None


@pytest.mark.parametrize(
    "key, value",
    [("stage", False), ("stage", "0"), ("round", False), ("device", ["phone"]), ("session", 7), ("channel", None)],
)
def test_hello_wrong_type_rejected(key: str, value: object) -> None:
    accepting = AcceptThread(TcpTransport(timeouts=LinkTimeouts(connect=1.0)))
    with socket.create_connection(("127.0.0.1", accepting.port), timeout=5) as attacker:
        write_frame(attacker, _hello_frame(_hello_json(**{key: value})))
        # A rejected HELLO gets no HELLO back, only a closed connection.
        with pytest.raises(PeerClosedError):
            read_frame(attacker, FrameLimits(), peer="listener")
        accepting.join()
    assert isinstance(accepting.error, PeerTimeoutError)


def test_silent_connection_does_not_block_peer() -> None:
    accepting = AcceptThread(_tcp())
    # Half a header: the listener waits for the rest, which never comes.
    with socket.create_connection(("127.0.0.1", accepting.port), timeout=5) as attacker:
        attacker.sendall(b"HSPL\x01")
        time.sleep(0.2)
        started = time.monotonic()
        _dial_expected(_tcp(), accepting.address)
        dial_seconds = time.monotonic() - started
        accepting.join()
    assert accepting.error is None, repr(accepting.error)
    assert dial_seconds < 2.0


def test_slowloris_accept_ends_by_deadline() -> None:
    transport = TcpTransport(timeouts=LinkTimeouts(connect=2.0))
    accepting = AcceptThread(transport)
    data = encode_header(Frame.text(FrameKind.HELLO, "x" * 64)) + b"x" * 64
    stop = time.monotonic() + 8.0
    with socket.create_connection(("127.0.0.1", accepting.port), timeout=5) as attacker:
        # One byte every 0.5 s: each recv call returns well within any socket timeout.
        for byte in data:
            if time.monotonic() > stop or not accepting.thread.is_alive():
                break
            try:
                attacker.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.5)
        accepting.join()
    assert isinstance(accepting.error, PeerTimeoutError)
    assert accepting.seconds is not None and accepting.seconds < 3.0


def test_connection_flood_still_accepts_peer() -> None:
    accepting = AcceptThread(_tcp())
    attackers = [socket.create_connection(("127.0.0.1", accepting.port), timeout=5) for _ in range(24)]
    try:
        # Half stay silent and hold a handshake slot, half send a bad HELLO.
        for attacker in attackers[:12]:
            write_frame(attacker, _hello_frame(b"[" * 4000))
        started = time.monotonic()
        _dial_expected(_tcp(), accepting.address)
        dial_seconds = time.monotonic() - started
        accepting.join()
    finally:
        for attacker in attackers:
            attacker.close()
    assert accepting.error is None, repr(accepting.error)
    assert dial_seconds < 2.0


def test_abort_bfloat16_reports_reason() -> None:
    left, right = socket.socketpair()
    timeouts = LinkTimeouts(recv=5.0, peer_silence=3.0, heartbeat=1.0)
    link = SocketLink(right, right, peer="attacker", timeouts=timeouts)
    try:
        write_frame(left, Frame(FrameKind.ABORT, torch.frombuffer(bytearray(b"oops"), dtype=torch.uint8).view(torch.bfloat16)))
        with pytest.raises(PeerAbortedError, match="oops"):
            link.recv(timeout=5.0)
    finally:
        link.close()
        left.close()


def test_tls_listener_survives_plaintext_slowloris(tmp_path: Path) -> None:
    household = Household.create(tmp_path / "smith", "smith")
    _, phone = household.enroll("phone", out=tmp_path / "phone")
    _, laptop = household.enroll("laptop", out=tmp_path / "laptop")
    timeouts = LinkTimeouts(connect=CONNECT_SECONDS)
    accepting = AcceptThread(TlsTransport(laptop, timeouts=timeouts))
    # A client that opens a TLS port and never completes the handshake.
    with socket.create_connection(("127.0.0.1", accepting.port), timeout=5) as attacker:
        attacker.sendall(b"\x16\x03")
        time.sleep(0.2)
        started = time.monotonic()
        _dial_expected(TlsTransport(phone, timeouts=timeouts), accepting.address)
        dial_seconds = time.monotonic() - started
        accepting.join()
    assert accepting.error is None, repr(accepting.error)
    assert dial_seconds < 3.0
