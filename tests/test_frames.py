"""The frame decoder against malformed, hostile and random input, on real sockets."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from socket_support import tcp_pair

from homesplit.bundle import DeviceBundle
from homesplit.errors import FrameError, LinkError
from homesplit.link import LinkTimeouts, SocketLink, read_frame, write_frame
from homesplit.pki import Household
from homesplit.tls import client_context, server_context
from homesplit.wire import (
    DTYPE_CODES,
    HEADER,
    MAGIC,
    VERSION,
    Frame,
    FrameHeader,
    FrameKind,
    FrameLimits,
    decode_fixed_header,
    decode_shape,
    encode_header,
)

LIMITS = FrameLimits()
TIMEOUTS = LinkTimeouts(connect=5.0, recv=5.0, peer_silence=5.0, heartbeat=1.0)
# Small limits keep fuzzed allocations small; they bound what the decoder may allocate.
FUZZ_LIMITS = FrameLimits(max_payload_bytes=1 << 16, max_ndim=4, max_parts=4)
DEADLINE_SECONDS = 5.0


def _header(*, magic=MAGIC, version=VERSION, kind=int(FrameKind.ACTIVATION), code=1, ndim=1, payload_bytes=16, shape=(4,)) -> bytes:
    fixed = HEADER.pack(magic, version, kind, code, ndim, 0, 0, 0, 0, 1, payload_bytes)
    return fixed + b"".join(struct.pack("<Q", size) for size in shape)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DeviceBundle]:
    root = tmp_path_factory.mktemp("household")
    household = Household.create(root / "ca", "smith")
    out = {}
    for device in ("phone", "laptop"):
        _, folder = household.enroll(device, out=root / device)
        out[device] = DeviceBundle.from_dir(folder)
    return out


def _tls_pair(bundles: dict[str, DeviceBundle]) -> tuple[socket.socket, socket.socket]:
    dialed, accepted = tcp_pair(dialed_timeout=DEADLINE_SECONDS)
    result: dict[str, socket.socket] = {}
    accepted.settimeout(DEADLINE_SECONDS)
    thread = threading.Thread(target=lambda: result.setdefault("server", server_context(bundles["laptop"]).wrap_socket(accepted, server_side=True)))
    thread.start()
    client = client_context(bundles["phone"]).wrap_socket(dialed)
    thread.join(timeout=DEADLINE_SECONDS)
    server = result["server"]
    server.settimeout(None)
    return client, server


@pytest.fixture(params=["tcp", "tls"])
def live_link(request: pytest.FixtureRequest, bundles: dict[str, DeviceBundle]):
    """A receiving SocketLink and the raw socket that feeds its inbound side."""
    sender, inbound = tcp_pair(dialed_timeout=DEADLINE_SECONDS) if request.param == "tcp" else _tls_pair(bundles)
    # The link's own outbound traffic (heartbeats) goes to a separate socket
    # that nobody reads, because TLS sockets must not be shared by two threads.
    outbound, sink = socket.socketpair()
    peer = f"phone@127.0.0.1:{sender.getsockname()[1]}"
    link = SocketLink(outbound, inbound, peer=peer, limits=LIMITS, timeouts=TIMEOUTS)
    yield sender, link, peer
    link.close()
    sender.close()
    sink.close()


def _assert_closed(sender: socket.socket) -> None:
    """Assert that the receiver closed the connection: the sender reads EOF or a reset."""
    sender.settimeout(DEADLINE_SECONDS)
    try:
        data = sender.recv(1)
    except (ConnectionError, ssl.SSLError):
        return
    assert data == b""


MALFORMED = {
    "wrong_magic": _header(magic=b"HTTP"),
    "wrong_version": _header(version=VERSION + 1),
    "length_disagrees_with_shape": _header(code=DTYPE_CODES[torch.float32], shape=(4, 4), ndim=2, payload_bytes=100),
    "ndim_over_limit": _header(ndim=LIMITS.max_ndim + 1, shape=(1,) * (LIMITS.max_ndim + 1)),
    "payload_of_1e12_bytes": _header(code=DTYPE_CODES[torch.uint8], payload_bytes=10**12, shape=(10**12,)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_link_rejects_malformed_header(case: str, live_link) -> None:
    sender, link, peer = live_link

    # Only the header is sent and the connection stays open: if the receiver
    # tried to read (or allocate) the announced payload, recv would time out.
    sender.sendall(MALFORMED[case])
    started = time.monotonic()
    with pytest.raises(FrameError) as raised:
        link.recv(timeout=DEADLINE_SECONDS)

    assert time.monotonic() - started < DEADLINE_SECONDS / 2
    assert peer in str(raised.value)
    _assert_closed(sender)


def test_link_rejects_truncated_frame(live_link) -> None:
    sender, link, peer = live_link
    sender.sendall(_header(code=DTYPE_CODES[torch.float32], payload_bytes=64, shape=(16,)) + b"\0" * 10)
    # On a TLS socket this ends the TCP stream without a close_notify alert.
    sender.shutdown(socket.SHUT_WR)

    with pytest.raises(FrameError, match=r"ended in the middle of a frame \(10 of 64 bytes\)") as raised:
        link.recv(timeout=DEADLINE_SECONDS)

    assert peer in str(raised.value)


def test_link_keeps_failing_after_rejection(live_link) -> None:
    sender, link, _ = live_link
    sender.sendall(MALFORMED["wrong_magic"])
    for _ in range(2):
        with pytest.raises(FrameError):
            link.recv(timeout=DEADLINE_SECONDS)
    with pytest.raises(FrameError):
        link.send(Frame(FrameKind.HEARTBEAT))


def test_read_frame_huge_header_allocates_nothing() -> None:
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.settimeout(DEADLINE_SECONDS)
        writer.sendall(MALFORMED["payload_of_1e12_bytes"])
        tracemalloc.start()
        try:
            with pytest.raises(FrameError, match="announces a payload of 1000000000000 bytes"):
                read_frame(reader, LIMITS, peer="phone")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 64 << 10


def test_decode_shape_rejects_stride_overflow() -> None:
    # An empty tensor whose other dimensions overflow torch's int64 strides.
    header = decode_fixed_header(_header(code=DTYPE_CODES[torch.uint8], ndim=3, payload_bytes=0, shape=())[: HEADER.size], LIMITS)
    shape = struct.pack("<QQQ", 0, 2**32, 2**32)
    with pytest.raises(FrameError, match="strides overflow"):
        decode_shape(header, shape, peer="phone")


SHAPES = [(), (0,), (0, 3), (5,), (2, 3, 4)]


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_round_trip_every_dtype(dtype: torch.dtype) -> None:
    dialed, accepted = tcp_pair(dialed_timeout=DEADLINE_SECONDS)
    with dialed, accepted:
        accepted.settimeout(DEADLINE_SECONDS)
        for index, shape in enumerate(SHAPES):
            tensor = (torch.randn(shape) * 50).to(dtype)
            frame = Frame(FrameKind.ACTIVATION, tensor, round=7, step=index, microbatch=3, part=1, parts=2)
            sent = write_frame(dialed, frame)
            received, size = read_frame(accepted, LIMITS, peer="phone")

            assert size == sent
            assert received.tensor.dtype == dtype
            assert received.tensor.shape == tensor.shape
            assert torch.equal(received.tensor, tensor)
            assert (received.kind, received.round, received.step, received.microbatch, received.part, received.parts) == (
                FrameKind.ACTIVATION, 7, index, 3, 1, 2
            )


def _assert_valid_frame(frame: Frame, limits: FrameLimits) -> None:
    assert frame.tensor.dtype in DTYPE_CODES
    assert frame.tensor.dim() <= limits.max_ndim
    assert frame.tensor.numel() * frame.tensor.element_size() <= limits.max_payload_bytes
    assert 0 <= frame.part < frame.parts <= limits.max_parts


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=2 * HEADER.size))
def test_decode_fixed_header_random_bytes(data: bytes) -> None:
    try:
        header = decode_fixed_header(data, FUZZ_LIMITS)
    except FrameError:
        return
    assert len(data) == HEADER.size
    assert header.ndim <= FUZZ_LIMITS.max_ndim
    assert header.payload_bytes <= FUZZ_LIMITS.max_payload_bytes


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(list(DTYPE_CODES)),
    ndim=st.integers(0, FUZZ_LIMITS.max_ndim),
    payload_bytes=st.integers(0, FUZZ_LIMITS.max_payload_bytes),
    shape_bytes=st.binary(max_size=8 * (FUZZ_LIMITS.max_ndim + 1)),
)
def test_decode_shape_random_bytes(dtype: torch.dtype, ndim: int, payload_bytes: int, shape_bytes: bytes) -> None:
    header = FrameHeader(FrameKind.ACTIVATION, dtype, 0, 0, 0, 0, 1, payload_bytes, ndim)
    try:
        decoded = decode_shape(header, shape_bytes)
    except FrameError:
        return
    assert len(decoded.shape) == ndim
    element = torch.empty(0, dtype=dtype).element_size()
    assert element * torch.Size(decoded.shape).numel() == payload_bytes


def _valid_frame_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    tensor = torch.zeros(shape, dtype=dtype)
    frame = Frame(FrameKind.ACTIVATION, tensor, parts=2, part=1)
    return encode_header(frame) + bytes(tensor.reshape(-1).view(torch.uint8).numpy())


@st.composite
def _wire_bytes(draw) -> bytes:
    """Random bytes, or a valid frame with bytes flipped, cut off or appended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    dtype = draw(st.sampled_from(list(DTYPE_CODES)))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
    data = bytearray(_valid_frame_bytes(dtype, shape))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    data += draw(st.binary(max_size=64))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_wire_bytes())
def test_read_frame_fuzzed_stream(data: bytes) -> None:
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.settimeout(DEADLINE_SECONDS)
        writer.sendall(data)
        writer.shutdown(socket.SHUT_WR)
        try:
            frame, size = read_frame(reader, FUZZ_LIMITS, peer="fuzzer")
        except (FrameError, LinkError):
            return

    _assert_valid_frame(frame, FUZZ_LIMITS)
    # A frame that decodes must re-encode to exactly the bytes it came from.
    payload = bytes(frame.tensor.reshape(-1).view(torch.uint8).numpy()) if frame.tensor.numel() else b""
    assert encode_header(frame) + payload == data[:size]


@pytest.mark.parametrize("numel", [4, 1 << 20], ids=["inline", "queued"])
def test_send_rejects_unsendable_dtype_in_caller(numel: int) -> None:
    left, right = socket.socketpair()
    link = SocketLink(left, left, peer="phone", limits=LIMITS, timeouts=TIMEOUTS)
    try:
        with pytest.raises(FrameError, match="cannot be sent"):
            link.send(Frame(FrameKind.ACTIVATION, torch.zeros(numel, dtype=torch.complex64)))

        link.send(Frame(FrameKind.ACTIVATION, torch.ones(3)))
        right.settimeout(DEADLINE_SECONDS)
        frame, _ = read_frame(right, LIMITS, peer="laptop")
        assert torch.equal(frame.tensor, torch.ones(3))
    finally:
        link.close()
        right.close()
