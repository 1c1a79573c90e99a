"""Hostile peers against TlsStream and the inline writes of SocketLink, on loopback.

The TLS peers here build their own ciphertext with `ssl.SSLObject`, so a test
can trickle it, cut it, tamper with it or end it with or without close_notify.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import socket
import ssl
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from socket_support import run_in_thread, tcp_pair

import homesplit.link
from homesplit.bundle import DeviceBundle
from homesplit.errors import FrameError, LinkError, PeerClosedError, PeerTimeoutError
from homesplit.link import LinkTimeouts, SocketLink, read_frame
from homesplit.pki import Household
from homesplit.tls import TlsTransport, client_context, server_context
from homesplit.tls_stream import TlsStream
from homesplit.transport import PeerIdentity, open_listener
from homesplit.wire import DTYPE_CODES, HEADER, Frame, FrameKind, FrameLimits, encode_header

PHONE = PeerIdentity("phone", 0, "smith")
LAPTOP = PeerIdentity("laptop", 1, "smith")
WAIT_SECONDS = 5.0
# Small limits keep fuzzed allocations small; they bound what the decoder may allocate.
FUZZ_LIMITS = FrameLimits(max_payload_bytes=1 << 16, max_ndim=4, max_parts=4)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("household")
    household = Household.create(root / "ca", "smith")
    return {device: household.enroll(device, out=root / device)[1] for device in ("phone", "laptop")}


def _tls_streams(bundles: dict[str, Path], dialed: socket.socket, accepted: socket.socket) -> tuple[TlsStream, TlsStream]:
    """Run the handshake of the phone (client) and laptop (server) and return both streams."""
    server: dict[str, TlsStream] = {}
    context = server_context(DeviceBundle.from_dir(bundles["laptop"]))
    thread = threading.Thread(target=lambda: server.setdefault("stream", TlsStream.handshake(accepted, context, server_side=True)))
    thread.start()
    client = TlsStream.handshake(dialed, client_context(DeviceBundle.from_dir(bundles["phone"])), server_side=False)
    thread.join(timeout=WAIT_SECONDS)
    return client, server["stream"]


class CiphertextPeer:
    """The phone as a TLS client whose ciphertext the test sends by hand."""

    def __init__(self, sock: socket.socket, bundle: Path) -> None:
        self.sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(DeviceBundle.from_dir(bundle)).wrap_bio(self._incoming, self._outgoing)
        sock.settimeout(WAIT_SECONDS)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(self._outgoing.read())
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("server closed the connection during the handshake")
                self._incoming.write(data)
        sock.sendall(self._outgoing.read())

    def encrypt(self, data: bytes) -> bytes:
        """Return `data` as TLS records, without sending them."""
        self.tls.write(data)
        return self._outgoing.read()

    def close_notify(self) -> bytes:
        """Return the close_notify alert, without sending it."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        return self._outgoing.read()


def _ciphertext_connection(bundles: dict[str, Path]) -> tuple[socket.socket, CiphertextPeer, TlsStream]:
    """Return the phone's raw socket, its `CiphertextPeer` and the laptop's server TlsStream."""
    raw, accepted = tcp_pair()
    server: dict[str, TlsStream] = {}
    context = server_context(DeviceBundle.from_dir(bundles["laptop"]))
    thread = threading.Thread(target=lambda: server.setdefault("stream", TlsStream.handshake(accepted, context, server_side=True)))
    thread.start()
    peer = CiphertextPeer(raw, bundles["phone"])
    thread.join(timeout=WAIT_SECONDS)
    return raw, peer, server["stream"]


def _client_hello(bundle: Path) -> bytes:
    """Return the phone's first handshake flight: a valid ClientHello record."""
    outgoing = ssl.MemoryBIO()
    tls = client_context(DeviceBundle.from_dir(bundle)).wrap_bio(ssl.MemoryBIO(), outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _trickle(sock: socket.socket, data: bytes, *, interval: float, stop: threading.Event) -> threading.Thread:
    """Send `data` one byte every `interval` seconds in a thread, until done, `stop` or a socket error."""

    def run() -> None:
        for byte in data:
            if stop.wait(interval):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class TlsReceiver:
    """A SocketLink that reads from a TlsStream fed by a `CiphertextPeer`."""

    def __init__(self, bundles: dict[str, Path], *, timeouts: LinkTimeouts | None = None) -> None:
        self.raw, self.peer, self.stream = _ciphertext_connection(bundles)
        self.name = f"phone@127.0.0.1:{self.raw.getsockname()[1]}"
        # The link sends its heartbeats into a socket pair that no thread reads.
        self._sink = socket.socketpair()
        timeouts = timeouts or LinkTimeouts(recv=WAIT_SECONDS, peer_silence=WAIT_SECONDS, heartbeat=1.0)
        self.link = SocketLink(self._sink[0], self.stream, peer=self.name, timeouts=timeouts)

    def close(self) -> None:
        self.link.close()
        self.raw.close()
        self._sink[1].close()


@pytest.fixture
def tls_receiver(bundles: dict[str, Path]):
    receiver = TlsReceiver(bundles)
    yield receiver
    receiver.close()


def _frame_bytes(frame: Frame) -> bytes:
    return encode_header(frame) + bytes(frame.tensor.reshape(-1).view(torch.uint8).numpy())


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- handshake ---------------------------------------------------------------------------


def test_handshake_trickled_hello_times_out(bundles: dict[str, Path]) -> None:
    dialed, accepted = tcp_pair()
    stop = threading.Event()
    context = server_context(DeviceBundle.from_dir(bundles["laptop"]))
    with dialed, accepted:
        # One byte every 0.2 s: each recv returns long before the 1 s timeout.
        _trickle(dialed, _client_hello(bundles["phone"]), interval=0.2, stop=stop)
        accepted.settimeout(1.0)
        try:
            outcome = run_in_thread(lambda: TlsStream.handshake(accepted, context, server_side=True), wait=3.0)
        finally:
            stop.set()
    assert isinstance(outcome, TimeoutError), repr(outcome)


class AcceptThread:
    """The laptop's `TlsTransport.accept`, run in a background thread."""

    def __init__(self, bundle: Path, timeouts: LinkTimeouts) -> None:
        self.listener = open_listener("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.transport = TlsTransport(bundle, timeouts=timeouts)
        self.result: dict[str, object] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result["link"] = self.transport.accept(self.listener, local=LAPTOP, expect=PHONE)
        except Exception as exc:  # noqa: BLE001 - reported to the test thread
            self.result["error"] = exc

    def join(self) -> SocketLink:
        self.thread.join(timeout=WAIT_SECONDS * 2)
        self.listener.close()
        assert "error" not in self.result, self.result.get("error")
        return self.result["link"]


def _send_and_keep(data: bytes):
    def attack(sock: socket.socket, bundles: dict[str, Path], stop: threading.Event) -> None:
        sock.sendall(data)

    return attack


def _send_client_hello(*, cut: int | None = None, close: bool):
    def attack(sock: socket.socket, bundles: dict[str, Path], stop: threading.Event) -> None:
        sock.sendall(_client_hello(bundles["phone"])[:cut])
        if close:
            sock.shutdown(socket.SHUT_WR)

    return attack


def _trickle_client_hello(sock: socket.socket, bundles: dict[str, Path], stop: threading.Event) -> None:
    _trickle(sock, _client_hello(bundles["phone"]), interval=0.3, stop=stop)


HANDSHAKE_ATTACKS = {
    "http_request": (_send_and_keep(b"GET / HTTP/1.1\r\nHost: laptop\r\n\r\n"), "sent an HTTP request"),
    "random_bytes": (_send_and_keep(random.Random(7).randbytes(300)), "did not start a TLS handshake"),
    "huge_record_length": (_send_and_keep(b"\x16\x03\x01\xff\xff"), "PACKET_LENGTH_TOO_LONG"),
    "close_mid_hello": (_send_client_hello(cut=50, close=True), "closed the connection during the TLS handshake"),
    "close_after_hello": (_send_client_hello(close=True), "closed the connection during the TLS handshake"),
    "stall_after_hello": (_send_client_hello(close=False), "TLS handshake timed out"),
    "trickled_hello": (_trickle_client_hello, "TLS handshake timed out"),
}


@pytest.mark.parametrize("case", list(HANDSHAKE_ATTACKS))
def test_listener_ends_bad_handshake(case: str, bundles: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    attack, reason = HANDSHAKE_ATTACKS[case]
    caplog.set_level(logging.WARNING, logger="homesplit")
    timeouts = LinkTimeouts(connect=4.0, recv=WAIT_SECONDS, peer_silence=WAIT_SECONDS, heartbeat=1.0)
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    stop = threading.Event()

    accepting = AcceptThread(bundles["laptop"], timeouts)
    attacker = socket.create_connection(accepting.listener.getsockname(), timeout=WAIT_SECONDS)
    attacker_address = f"127.0.0.1:{attacker.getsockname()[1]}"
    try:
        attack(attacker, bundles, stop)
        time.sleep(0.2)
        link = TlsTransport(bundles["phone"], timeouts=timeouts).dial(accepting.address, local=PHONE, expect=LAPTOP)
        accepted = accepting.join()
        link.close()
        accepted.close()

        # Every handshake thread must end by the accept deadline, however the attacker behaves.
        deadline = time.monotonic() + timeouts.connect + 2.0
        handshakes = [t for t in threading.enumerate() if t.name.startswith("homesplit-hello-")]
        for thread in handshakes:
            thread.join(timeout=max(deadline - time.monotonic(), 0))
        assert not [t.name for t in handshakes if t.is_alive()]
    finally:
        stop.set()
        attacker.close()

    rejections = [r.getMessage() for r in caplog.records if r.name == "homesplit.transport"]
    assert len(rejections) == 1, rejections
    assert reason in rejections[0]
    assert f"Rejected connection from {attacker_address}:" in rejections[0]
    time.sleep(0.2)
    assert [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()] == []
    assert _open_fds() == fds_before


# -- data path -----------------------------------------------------------------------------

CUT_FRAME = Frame(FrameKind.ACTIVATION, torch.arange(16, dtype=torch.float32))


def _ragged_eof(peer: CiphertextPeer) -> bytes:
    return peer.encrypt(_frame_bytes(CUT_FRAME)[: HEADER.size + 8 + 10])


def _close_notify_mid_frame(peer: CiphertextPeer) -> bytes:
    return peer.encrypt(_frame_bytes(CUT_FRAME)[: HEADER.size + 8 + 10]) + peer.close_notify()


def _truncated_record(peer: CiphertextPeer) -> bytes:
    header = peer.encrypt(encode_header(CUT_FRAME))
    payload = peer.encrypt(_frame_bytes(CUT_FRAME)[HEADER.size + 8 :])
    return header + payload[: len(payload) // 2]


CUT_STREAMS = {
    "ragged_eof": (_ragged_eof, r"ended in the middle of a frame \(10 of 64 bytes\)"),
    "close_notify": (_close_notify_mid_frame, r"ended in the middle of a frame \(10 of 64 bytes\)"),
    "truncated_record": (_truncated_record, "ended inside a 64-byte payload"),
}


@pytest.mark.parametrize("case", list(CUT_STREAMS))
def test_tls_link_reports_cut_frame(case: str, tls_receiver: TlsReceiver) -> None:
    make, message = CUT_STREAMS[case]
    tls_receiver.raw.sendall(make(tls_receiver.peer))
    tls_receiver.raw.shutdown(socket.SHUT_WR)

    with pytest.raises(FrameError, match=message) as raised:
        tls_receiver.link.recv(timeout=WAIT_SECONDS)
    assert tls_receiver.name in str(raised.value)


def _flip_byte(peer: CiphertextPeer) -> bytes:
    record = bytearray(peer.encrypt(_frame_bytes(CUT_FRAME)))
    record[-3] ^= 0x01
    return bytes(record)


TAMPERED_STREAMS = {
    "flipped_ciphertext_byte": _flip_byte,
    "huge_record_length": lambda peer: b"\x17\x03\x03\xff\xff" + b"\0" * 64,
    "plaintext_frame": lambda peer: _frame_bytes(CUT_FRAME),
}


@pytest.mark.parametrize("case", list(TAMPERED_STREAMS))
def test_tls_link_fails_on_tampered_record(case: str, tls_receiver: TlsReceiver) -> None:
    # The connection stays open: the receiver must fail on the record itself.
    tls_receiver.raw.sendall(TAMPERED_STREAMS[case](tls_receiver.peer))
    started = time.monotonic()
    with pytest.raises(LinkError) as raised:
        tls_receiver.link.recv(timeout=WAIT_SECONDS)
    assert time.monotonic() - started < WAIT_SECONDS / 2
    assert tls_receiver.name in str(raised.value)


def test_tls_link_reads_trickled_frames(tls_receiver: TlsReceiver) -> None:
    frames = [Frame(FrameKind.ACTIVATION, torch.arange(size, dtype=torch.int16), step=size) for size in (0, 3, 40)]
    ciphertext = b"".join(tls_receiver.peer.encrypt(_frame_bytes(frame)) for frame in frames)
    stop = threading.Event()
    _trickle(tls_receiver.raw, ciphertext, interval=0.001, stop=stop)
    try:
        for frame in frames:
            received = tls_receiver.link.recv(timeout=WAIT_SECONDS)
            assert received.step == frame.step
            assert torch.equal(received.tensor, frame.tensor)
    finally:
        stop.set()


def test_read_frame_deadline_bounds_tls_trickle(bundles: dict[str, Path]) -> None:
    raw, peer, stream = _ciphertext_connection(bundles)
    stop = threading.Event()
    with raw, stream:
        # One TLS record, one byte every 0.2 s: each socket call returns in time, the frame never does.
        _trickle(raw, peer.encrypt(_frame_bytes(Frame.text(FrameKind.HELLO, "x" * 100))), interval=0.2, stop=stop)
        try:
            outcome = run_in_thread(
                lambda: read_frame(stream, FrameLimits(), peer="phone", deadline=time.monotonic() + 1.0), wait=3.0
            )
        finally:
            stop.set()
    assert isinstance(outcome, PeerTimeoutError), repr(outcome)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to send a KeyUpdate")
def test_tls_stream_follows_peer_key_update(bundles: dict[str, Path]) -> None:
    # Python's ssl module cannot send a KeyUpdate; `openssl s_client` does on a "K" line.
    listener = socket.create_server(("127.0.0.1", 0))
    phone = DeviceBundle.from_dir(bundles["phone"])
    command = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{listener.getsockname()[1]}", "-tls1_3",
        "-cert", str(phone.cert), "-key", str(phone.key), "-CAfile", str(phone.ca), "-verify_return_error",
    ]  # fmt: skip
    client = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        listener.settimeout(WAIT_SECONDS)
        accepted, _ = listener.accept()
        accepted.settimeout(WAIT_SECONDS)
        stream = TlsStream.handshake(accepted, server_context(DeviceBundle.from_dir(bundles["laptop"])), server_side=True)
        buffer = bytearray(64)

        client.stdin.write(b"before\n")
        client.stdin.flush()
        assert buffer[: stream.recv_into(buffer)] == b"before\n"
        # "K" requests an update, so this side must respond with a KeyUpdate of its own.
        # s_client reads a command only from a line read on its own, hence the pause.
        client.stdin.write(b"K\n")
        client.stdin.flush()
        time.sleep(0.3)
        client.stdin.write(b"after\n")
        client.stdin.flush()
        assert buffer[: stream.recv_into(buffer)] == b"after\n"
        stream.sendall(b"reply\n")
        time.sleep(0.5)
        stream.close()
        output = client.communicate(timeout=WAIT_SECONDS)[0].decode(errors="replace")
    finally:
        listener.close()
        if client.poll() is None:
            client.kill()
            client.wait(timeout=WAIT_SECONDS)
    assert "KEYUPDATE" in output
    assert "\nreply\n" in output


@st.composite
def _tls_wire(draw) -> tuple[bytes, list[int], bool]:
    """Plaintext (random, or a frame with bytes changed or cut), record split points and close_notify or not."""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=512))
    else:
        dtype = draw(st.sampled_from(list(DTYPE_CODES)))
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        data = bytearray(_frame_bytes(Frame(FrameKind.ACTIVATION, torch.zeros(shape, dtype=dtype), part=1, parts=2)))
        for _ in range(draw(st.integers(0, 4))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            # A payload length that disagrees with the shape, or claims far more than the limit.
            data[24:32] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        data = bytes(data[: draw(st.integers(0, len(data)))])
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return data, cuts, draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(wire=_tls_wire())
def test_read_frame_fuzzed_over_tls(wire: tuple[bytes, list[int], bool], bundles: dict[str, Path]) -> None:
    data, cuts, close_notify = wire
    raw, peer, stream = _ciphertext_connection(bundles)
    with raw, stream:
        # Each cut starts a new TLS record, so frame fields straddle record boundaries.
        bounds = [0, *cuts, len(data)]
        for start, end in zip(bounds, bounds[1:]):
            if end > start:
                raw.sendall(peer.encrypt(data[start:end]))
        raw.sendall(peer.close_notify() if close_notify else b"")
        raw.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        try:
            frame, size = read_frame(stream, FUZZ_LIMITS, peer="fuzzer", deadline=started + WAIT_SECONDS)
        except FrameError:
            return
        except LinkError as exc:
            assert isinstance(exc, PeerClosedError), exc
            assert data == b""
            return

    assert frame.tensor.numel() * frame.tensor.element_size() <= FUZZ_LIMITS.max_payload_bytes
    payload = bytes(frame.tensor.reshape(-1).view(torch.uint8).numpy()) if frame.tensor.numel() else b""
    assert encode_header(frame) + payload == data[:size]


# -- inline writes of SocketLink -----------------------------------------------------------

LINK_TIMEOUTS = LinkTimeouts(recv=WAIT_SECONDS, peer_silence=WAIT_SECONDS, heartbeat=0.5)


class OneWayLinks:
    """A sending and a receiving SocketLink over one TCP or TLS connection.

    Each link's other direction is one end of a socket pair, so that each
    hears the other's heartbeats.
    """

    def __init__(self, kind: str, bundles: dict[str, Path], *, buffer_bytes: int | None = None) -> None:
        dialed, accepted = tcp_pair(buffer_bytes=buffer_bytes)
        self.raw = (dialed, accepted)
        outbound, inbound = (dialed, accepted) if kind == "tcp" else _tls_streams(bundles, dialed, accepted)
        self.inbound = inbound
        self.spare = socket.socketpair()
        self.sender = SocketLink(outbound, self.spare[0], peer="laptop", timeouts=LINK_TIMEOUTS)
        self.receiver = SocketLink(self.spare[1], inbound, peer="phone", timeouts=LINK_TIMEOUTS)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        for sock in self.raw:
            sock.close()


@pytest.fixture(params=["tcp", "tls"])
def link_kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _filled(value: int, count: int, **coordinates: int) -> Frame:
    return Frame(FrameKind.ACTIVATION, torch.full((count,), value, dtype=torch.uint8), **coordinates)


def test_inline_rest_stays_before_queued_frame(link_kind: str, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Small socket buffers and a receiver that is not reading yet make the
    # inline write partial. While it runs, another thread queues a large frame.
    dialed, accepted = tcp_pair(buffer_bytes=65536)
    outbound, inbound = (dialed, accepted) if link_kind == "tcp" else _tls_streams(bundles, dialed, accepted)
    spare = socket.socketpair()
    sender = SocketLink(outbound, spare[0], peer="laptop", timeouts=LINK_TIMEOUTS)
    inline_started, queued = threading.Event(), threading.Event()
    encode = homesplit.link.encode_header
    inline_thread: list[threading.Thread] = []

    def encode_and_pause(frame: Frame) -> bytes:
        if threading.current_thread() in inline_thread and not inline_started.is_set():
            inline_started.set()
            queued.wait(WAIT_SECONDS)
        return encode(frame)

    monkeypatch.setattr(homesplit.link, "encode_header", encode_and_pause)
    small, large = _filled(1, 60_000, step=1), _filled(2, 200_000, step=2)
    inline_thread.append(threading.Thread(target=sender.send, args=(small,)))
    try:
        inline_thread[0].start()
        assert inline_started.wait(WAIT_SECONDS)
        sender.send(large)
        queued.set()
        inline_thread[0].join(WAIT_SECONDS)

        inbound.settimeout(WAIT_SECONDS)
        received = [read_frame(inbound, FrameLimits(), peer="laptop")[0] for _ in range(2)]
    finally:
        queued.set()
        sender.close()
        for sock in (dialed, accepted, *spare):
            sock.close()
    by_step = {frame.step: frame for frame in received}
    assert sorted(by_step) == [1, 2]
    assert torch.equal(by_step[1].tensor, small.tensor)
    assert torch.equal(by_step[2].tensor, large.tensor)


SENDERS = 4
FRAMES_PER_SENDER = 80
# Sizes in bytes: inline candidates up to 64 KiB, then queued frames.
SIZES = [8, 1_000, 30_000, 65_536, 100_000, 200_000]


def test_concurrent_senders_keep_order(link_kind: str, bundles: dict[str, Path]) -> None:
    links = OneWayLinks(link_kind, bundles, buffer_bytes=16384)
    returned = [-1] * SENDERS
    required: list[int] = []
    close_now = threading.Event()

    def send_all(sender_id: int) -> None:
        sizes = random.Random(sender_id)
        for step in range(FRAMES_PER_SENDER):
            if step == FRAMES_PER_SENDER // 2 and sender_id == 0:
                close_now.set()
            try:
                links.sender.send(_filled(step % 251, sizes.choice(SIZES), microbatch=sender_id, step=step))
            except PeerClosedError:
                return
            returned[sender_id] = step

    def close_midway() -> None:
        close_now.wait(WAIT_SECONDS * 4)
        # Every frame whose send returned before close started must arrive.
        required.extend(returned)
        links.sender.close()

    threads = [threading.Thread(target=send_all, args=(i,)) for i in range(SENDERS)]
    threads.append(threading.Thread(target=close_midway))
    for thread in threads:
        thread.start()
    last = [-1] * SENDERS
    try:
        with pytest.raises(PeerClosedError, match="finished and closed the link"):
            while True:
                frame = links.receiver.recv(timeout=WAIT_SECONDS * 2)
                sender_id, step = frame.microbatch, frame.step
                assert step == last[sender_id] + 1, f"sender {sender_id}: step {step} after {last[sender_id]}"
                assert torch.all(frame.tensor == step % 251), f"sender {sender_id} step {step}: payload corrupted"
                last[sender_id] = step
    finally:
        for thread in threads:
            thread.join(WAIT_SECONDS * 4)
        links.close()
    for sender_id in range(SENDERS):
        assert last[sender_id] >= required[sender_id], f"sender {sender_id}"


def test_send_never_blocks_on_stalled_peer(link_kind: str, bundles: dict[str, Path]) -> None:
    dialed, accepted = tcp_pair()
    outbound, inbound = (dialed, accepted) if link_kind == "tcp" else _tls_streams(bundles, dialed, accepted)
    spare = socket.socketpair()
    # No thread reads `inbound` or writes to `spare`, so the peer has stalled.
    sender = SocketLink(outbound, spare[0], peer="laptop", timeouts=LINK_TIMEOUTS)
    slowest = 0.0
    try:
        for step in range(400):
            frame = _filled(step % 251, SIZES[step % len(SIZES)], step=step)
            started = time.monotonic()
            sender.send(frame)
            slowest = max(slowest, time.monotonic() - started)
        started = time.monotonic()
        with pytest.raises(PeerTimeoutError):
            sender.recv(timeout=1.0)
        recv_seconds = time.monotonic() - started
    finally:
        started = time.monotonic()
        sender.close()
        close_seconds = time.monotonic() - started
        for sock in (dialed, accepted, *spare):
            sock.close()
    # A send that waited for the network would block until close, far beyond these bounds.
    assert slowest < 1.0
    assert recv_seconds < 3.0
    # close waits heartbeat + 5 s for the blocked writer, then tears the sockets down.
    assert close_seconds < LINK_TIMEOUTS.heartbeat + 5.0 + 1.0


def _wait_for_bytes(sock: socket.socket, count: int) -> None:
    """Wait until `sock`'s kernel receive buffer contains at least `count` unread bytes."""
    deadline = time.monotonic() + WAIT_SECONDS
    while _unread_bytes(sock) < count:
        assert time.monotonic() < deadline, f"only {_unread_bytes(sock)} of {count} bytes arrived within {WAIT_SECONDS} s"
        time.sleep(0.005)


def _unread_bytes(sock: socket.socket) -> int:
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little")


@pytest.mark.parametrize("close_notify", [False, True], ids=["open", "close_notify"])
def test_recv_into_decrypts_every_buffered_record(close_notify: bool, bundles: dict[str, Path]) -> None:
    # Three full 16 KiB records wait in the kernel buffer before the first read.
    # The stream must return all of them in one call rather than one record per
    # call, and must not lose them when a close_notify follows.
    raw, peer, stream = _ciphertext_connection(bundles)
    try:
        plaintext = os.urandom(3 << 14)
        ciphertext = peer.encrypt(plaintext) + (peer.close_notify() if close_notify else b"")
        raw.sendall(ciphertext)
        _wait_for_bytes(stream._sock, len(ciphertext))
        stream.settimeout(WAIT_SECONDS)
        buffer = bytearray(len(plaintext) + 100)

        assert stream.recv_into(buffer) == len(plaintext)
        assert buffer[: len(plaintext)] == plaintext
        if close_notify:
            assert stream.recv_into(buffer) == 0
    finally:
        raw.close()
        stream.close()


@pytest.mark.parametrize("nbytes", [-1, 65], ids=["negative", "past_buffer"])
def test_recv_into_rejects_bad_size(nbytes: int, bundles: dict[str, Path]) -> None:
    # A plain socket raises ValueError for these sizes. Returning 0 would look like a closed connection.
    raw, _, stream = _ciphertext_connection(bundles)
    try:
        with pytest.raises(ValueError):
            stream.recv_into(bytearray(64), nbytes)
    finally:
        raw.close()
        stream.close()
