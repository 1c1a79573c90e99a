"""Links between neighbouring pipeline stages.

A `Link` sends and receives `Frame` objects to and from one peer. The pipeline
runtime sees only this interface, so it runs unchanged over plaintext TCP on
loopback (tests, benchmarks) and over mutual TLS between household devices.

`SocketLink` drives two stream sockets, one per direction. Each socket has a
single owner thread: a writer thread sends queued frames on the outbound
socket and a reader thread decodes frames from the inbound socket. Separate
sockets matter for TLS, because an OpenSSL connection must not be read and
written from two threads at once. The queue matters for deadlock freedom: with
1F1B, neighbours send activations and gradients to each other at the same time,
and two blocking `sendall` calls on full socket buffers would wait forever.
A small frame skips the queue when nothing is queued: the sending thread
writes it itself with a non-blocking call, and hands any rest to the writer.
"""

from __future__ import annotations

import abc
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from homesplit.errors import (
    FrameError,
    LinkError,
    PeerAbortedError,
    PeerClosedError,
    PeerTimeoutError,
)
from homesplit.wire import (
    HEADER,
    Frame,
    FrameKind,
    FrameLimits,
    decode_fixed_header,
    decode_shape,
    encode_header,
    tensor_payload,
)
from homesplit.tls_stream import TlsStream

__all__ = ["Link", "LinkTimeouts", "SocketLink", "read_frame", "write_frame"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkTimeouts:
    """Deadlines of a link, in seconds.

    Parameters
    ----------
    connect : float, default 60.0
        How long to keep dialing or accepting until the peer is connected.
    recv : float, default 300.0
        Longest wait for one expected frame, however lively the peer is.
    peer_silence : float, default 15.0
        Maximum time without any byte from the peer, heartbeats included,
        before the peer counts as gone. The bytes of a frame still arriving
        count too, so a large frame on a slow network is not silence. Must
        exceed `heartbeat`.
    heartbeat : float, default 2.0
        Interval at which an idle sender emits a heartbeat frame.
    """

    connect: float = 60.0
    recv: float = 300.0
    peer_silence: float = 15.0
    heartbeat: float = 2.0

    def __post_init__(self) -> None:
        for name in ("connect", "recv", "peer_silence", "heartbeat"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"LinkTimeouts.{name}={value!r} must be a positive number of seconds")
        if self.peer_silence <= self.heartbeat:
            raise ValueError(
                f"LinkTimeouts.peer_silence={self.peer_silence} must exceed heartbeat={self.heartbeat}, "
                "otherwise a healthy idle peer counts as gone"
            )


class Link(abc.ABC):
    """A bidirectional, ordered frame channel to one peer stage.

    Frames arrive in the order the peer sent them. `send` never blocks on the
    network. `recv` waits at most its deadline.
    """

    peer: str
    """Name of the peer for messages: its device name and address."""

    @abc.abstractmethod
    def send(self, frame: Frame) -> None:
        """Send `frame`, or queue it for sending, without waiting for the network.

        Raises
        ------
        LinkError
            If the link already failed.
        FrameError
            If the frame cannot be encoded (an unsupported dtype, or a step
            or micro-batch index out of range); nothing was sent.
        """

    @abc.abstractmethod
    def recv(self, *, timeout: float | None = None) -> Frame:
        """Return the next frame from the peer, waiting at most `timeout` seconds.

        Heartbeats are consumed internally and never returned.

        Raises
        ------
        PeerTimeoutError
            If no frame has arrived by the deadline, or the peer falls silent
            before one arrives.
        PeerClosedError
            If the peer closed the connection or died.
        PeerAbortedError
            If the peer reported an error of its own.
        FrameError
            If the peer sent a malformed frame; the link is closed.
        """

    @abc.abstractmethod
    def close(self, *, reason: str | None = None) -> None:
        """Close the link, telling the peer `reason` if it is an abort."""

    @property
    @abc.abstractmethod
    def bytes_sent(self) -> int:
        """Bytes written to the network so far, headers included."""

    @property
    @abc.abstractmethod
    def bytes_received(self) -> int:
        """Bytes read from the network so far, headers included."""


def _recv_exactly_into(
    sock: socket.socket,
    view: memoryview,
    peer: str,
    part: str,
    deadline: float | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Fill `view` from `sock`. Errors name `part`, the part of the frame that `view` contains."""
    received = 0
    while received < len(view):
        if deadline is not None:
            # A socket timeout bounds each recv call, not the whole read, so a
            # peer that trickles one byte at a time would never hit it.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _read_timeout(peer, received, len(view), part, "the read deadline")
            sock.settimeout(remaining)
        try:
            n = sock.recv_into(view[received:])
        except TimeoutError:
            # A plain socket raises socket.timeout (TimeoutError since Python 3.10)
            # and a TlsStream raises TimeoutError when its deadline passes.
            limit = "the read deadline" if deadline is not None else f"the socket timeout of {sock.gettimeout()} s"
            raise _read_timeout(peer, received, len(view), part, limit) from None
        if n == 0:
            if received:
                raise FrameError(f"connection from {peer} ended in the middle of a frame ({received} of {len(view)} bytes)")
            raise PeerClosedError(f"peer {peer} closed the connection", peer=peer)
        received += n
        if on_bytes is not None:
            on_bytes(n)


def _read_timeout(peer: str, received: int, size: int, part: str, limit: str) -> PeerTimeoutError:
    return PeerTimeoutError(
        f"timed out reading a frame from peer {peer}: {received} of {size} bytes of its {part} arrived before {limit}",
        peer=peer,
    )


def read_frame(
    sock: socket.socket,
    limits: FrameLimits,
    *,
    peer: str,
    deadline: float | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[Frame, int]:
    """Read one frame from a blocking stream socket.

    Parameters
    ----------
    sock : socket.socket
        Connected stream socket; its timeout is changed when `deadline` is set.
    limits : FrameLimits
        Bounds the header must respect.
    peer : str
        Peer name for error messages.
    deadline : float or None, default None
        `time.monotonic` time by which the whole frame must have arrived. None
        leaves the socket's own timeout, which bounds each recv call only.
    on_bytes : callable or None, default None
        Called with the byte count of each recv call that returned data, so
        that a caller can tell a slow frame from a silent peer.

    Returns
    -------
    tuple of (Frame, int)
        The frame and the number of bytes it took on the wire.

    Raises
    ------
    FrameError
        If the header is invalid; no payload memory has been allocated then.
    PeerClosedError
        If the connection ends cleanly before a frame starts.
    PeerTimeoutError
        If `deadline` passes before the whole frame has arrived or, without a
        `deadline`, if one recv call outlasts the socket's timeout. If part of
        the frame had already arrived, the connection cannot be read further,
        because the next read would start inside this frame.
    """
    fixed = bytearray(HEADER.size)
    _recv_exactly_into(sock, memoryview(fixed), peer, "header", deadline, on_bytes)
    header = decode_fixed_header(fixed, limits, peer=peer)
    shape_bytes = bytearray(8 * header.ndim)
    if shape_bytes:
        try:
            _recv_exactly_into(sock, memoryview(shape_bytes), peer, "shape", deadline, on_bytes)
        except PeerClosedError:
            raise FrameError(f"connection from {peer} ended inside a frame header") from None
    header = decode_shape(header, shape_bytes, peer=peer)

    # The length was checked against the limit and the shape above, so this
    # allocation is bounded by FrameLimits.max_payload_bytes. torch.empty skips
    # the zero fill that bytearray would do before the socket overwrites it.
    payload = torch.empty(header.payload_bytes, dtype=torch.uint8)
    if header.payload_bytes:
        try:
            _recv_exactly_into(sock, memoryview(payload.numpy()), peer, "payload", deadline, on_bytes)
        except PeerClosedError:
            raise FrameError(
                f"connection from {peer} ended inside a {header.payload_bytes}-byte payload"
            ) from None
    frame = Frame(
        header.kind,
        payload.view(header.dtype).reshape(header.shape),
        round=header.round,
        step=header.step,
        microbatch=header.microbatch,
        part=header.part,
        parts=header.parts,
    )
    return frame, HEADER.size + len(shape_bytes) + header.payload_bytes


# Payloads up to this size are copied behind their header and sent in one call:
# one system call (one TLS record) instead of two costs less than the copy.
_COALESCE_BYTES = 64 << 10


def write_frame(sock: socket.socket, frame: Frame) -> int:
    """Write one frame to a blocking stream socket and return its size in bytes."""
    header = encode_header(frame)
    payload = tensor_payload(frame.tensor)
    if len(payload) <= _COALESCE_BYTES:
        sock.sendall(header + payload)
    else:
        sock.sendall(header)
        sock.sendall(payload)
    return len(header) + len(payload)


# Frames up to this size are written by the sending thread itself while the
# link has nothing queued: that saves a switch to the writer thread, which is
# a large part of a small frame's round trip. Such a write never waits for the
# network; what the socket does not take at once goes to the writer thread.
_INLINE_BYTES = _COALESCE_BYTES


class _Leftover:
    """Queue item that wakes the writer thread to finish a non-blocking write.

    The unwritten bytes stay with the link (`SocketLink._unsent`) or, for a
    `TlsStream`, inside the stream, because they must go out before whatever
    the writer thread writes next, even a frame queued ahead of this item.
    """


class _Failure:
    """Queue item that carries the error which ended the reader."""

    def __init__(self, error: LinkError | FrameError) -> None:
        self.error = error


_STOP = object()


class SocketLink(Link):
    """A `Link` over two connected stream sockets, one per direction.

    Parameters
    ----------
    outbound : socket.socket
        Socket this side writes to; only the writer thread touches it.
    inbound : socket.socket
        Socket this side reads from; only the reader thread touches it. It may
        be the same object as `outbound` for plain TCP sockets, never for TLS.
    peer : str
        Peer name used in errors and logs.
    limits : FrameLimits, optional
        Header limits for received frames.
    timeouts : LinkTimeouts, optional
        Deadlines for receiving and for peer liveness.
    """

    def __init__(
        self,
        outbound: socket.socket,
        inbound: socket.socket,
        *,
        peer: str,
        limits: FrameLimits | None = None,
        timeouts: LinkTimeouts | None = None,
    ) -> None:
        self.peer = peer
        self._outbound = outbound
        self._inbound = inbound
        self._limits = limits or FrameLimits()
        self._timeouts = timeouts or LinkTimeouts()
        self._outgoing: queue.Queue[object] = queue.Queue()
        # Exactly one thread writes at a time: the sender (inline) or the
        # writer thread. `_backlog` counts queued items not yet written, so
        # an inline write never overtakes a queued frame.
        self._write_state = threading.Condition()
        self._writing = False
        self._backlog = 0
        # Bytes of an inline write to a plain socket that the socket did not take.
        self._unsent = b""
        self._incoming: queue.Queue[object] = queue.Queue()
        self._error: LinkError | FrameError | None = None
        self._closed = False
        self._last_seen = time.monotonic()
        self._sent = 0
        self._received = 0
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name=f"homesplit-send-{peer}", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"homesplit-recv-{peer}", daemon=True)
        self._writer.start()
        self._reader.start()

    @property
    def bytes_sent(self) -> int:
        return self._sent

    @property
    def bytes_received(self) -> int:
        return self._received

    def send(self, frame: Frame) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise PeerClosedError(f"link to {self.peer} is closed", peer=self.peer)
        if frame.tensor.numel() * frame.tensor.element_size() <= _INLINE_BYTES and self._can_write_inline():
            with self._write_state:
                inline = self._backlog == 0 and not self._writing
                if inline:
                    self._writing = True
            if inline:
                self._write_inline(frame)
                return
        # The writer thread would meet an unsupported dtype or an out-of-range
        # step only later, where the caller cannot see the error: check now.
        encode_header(frame)
        self._enqueue(frame)

    def _can_write_inline(self) -> bool:
        sock = self._outbound
        # A socket with a timeout is non-blocking inside Python, and an
        # ssl.SSLSocket cannot write part of a record: both use the queue.
        return (isinstance(sock, TlsStream) or type(sock) is socket.socket) and sock.gettimeout() is None

    def _enqueue(self, item: object) -> None:
        with self._write_state:
            self._backlog += 1
            self._outgoing.put(item)

    def _write_inline(self, frame: Frame) -> None:
        leftover: _Leftover | None = None
        try:
            data = encode_header(frame) + tensor_payload(frame.tensor)
            if isinstance(self._outbound, TlsStream):
                if not self._outbound.send_nowait(data):
                    leftover = _Leftover()
            else:
                try:
                    written = self._outbound.send(data, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    written = 0
                if written < len(data):
                    self._unsent = data[written:]
                    leftover = _Leftover()
            self._sent += len(data)
        except (OSError, ValueError) as exc:
            if not self._closed:
                self._fail(PeerClosedError(f"sending to {self.peer} failed: {exc}", peer=self.peer))
        finally:
            with self._write_state:
                if leftover is not None:
                    self._backlog += 1
                    self._outgoing.put(leftover)
                self._writing = False
                self._write_state.notify_all()

    def recv(self, *, timeout: float | None = None) -> Frame:
        wait = self._timeouts.recv if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            try:
                # A frame that has already arrived is returned even after the
                # deadline, or when the peer fell silent after sending it.
                item = self._incoming.get_nowait()
            except queue.Empty:
                now = time.monotonic()
                if now >= deadline:
                    raise PeerTimeoutError(f"timed out after {wait:.1f} s waiting for a frame from peer {self.peer}", peer=self.peer)
                silence = now - self._last_seen
                if silence > self._timeouts.peer_silence:
                    raise PeerTimeoutError(
                        f"peer {self.peer} sent nothing, not even a heartbeat, for {silence:.1f} s "
                        f"(peer_silence={self._timeouts.peer_silence} s)",
                        peer=self.peer,
                    )
                try:
                    item = self._incoming.get(timeout=min(deadline - now, 0.25))
                except queue.Empty:
                    continue
            if isinstance(item, _Failure):
                # Leave the failure in place so every later call raises it too.
                self._incoming.put(item)
                raise item.error
            assert isinstance(item, Frame)
            return item

    def close(self, *, reason: str | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        final = Frame.text(FrameKind.ABORT, reason) if reason else Frame(FrameKind.END)
        self._enqueue(final)
        self._enqueue(_STOP)
        # Give the writer a bounded moment to flush queued frames, then tear
        # the sockets down so that the reader unblocks.
        self._writer.join(timeout=self._timeouts.heartbeat + 5.0)
        for sock in {id(self._outbound): self._outbound, id(self._inbound): self._inbound}.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self._reader.join(timeout=5.0)

    def _fail(self, error: LinkError | FrameError) -> None:
        if self._error is None:
            self._error = error
        self._incoming.put(_Failure(error))

    def _write_loop(self) -> None:
        heartbeat = Frame(FrameKind.HEARTBEAT)
        while True:
            try:
                item = self._outgoing.get(timeout=self._timeouts.heartbeat)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            with self._write_state:
                if item is None and self._writing:
                    # The sender is writing right now, so the peer hears from
                    # this side anyway.
                    continue
                while self._writing:
                    # An inline write never waits for the network, so this
                    # wait is short; the timeout only guards against a bug.
                    self._write_state.wait(timeout=1.0)
                self._writing = True
            try:
                # Another thread may have queued a frame while an inline write
                # ran, ahead of its _Leftover: the rest of that write goes first.
                self._finish_inline_write()
                if not isinstance(item, _Leftover):
                    self._sent += write_frame(self._outbound, heartbeat if item is None else item)
            except (OSError, ValueError) as exc:
                if not self._closed:
                    self._fail(PeerClosedError(f"sending to {self.peer} failed: {exc}", peer=self.peer))
                return
            finally:
                with self._write_state:
                    self._writing = False
                    if item is not None:
                        self._backlog -= 1
                    self._write_state.notify_all()

    def _finish_inline_write(self) -> None:
        if isinstance(self._outbound, TlsStream):
            self._outbound.flush()
        elif self._unsent:
            self._outbound.sendall(self._unsent)
            self._unsent = b""

    def _read_loop(self) -> None:
        while True:
            try:
                frame, size = read_frame(self._inbound, self._limits, peer=self.peer, on_bytes=self._note_bytes)
            except (LinkError, FrameError) as exc:
                if isinstance(exc, FrameError):
                    logger.error("Closing link to %s: %s", self.peer, exc)
                    self._shutdown_inbound()
                self._fail(exc)
                return
            except (OSError, ValueError) as exc:
                if self._closed:
                    return
                self._fail(PeerClosedError(f"receiving from {self.peer} failed: {exc}", peer=self.peer))
                return
            self._received += size
            self._last_seen = time.monotonic()
            if frame.kind is FrameKind.HEARTBEAT:
                continue
            if frame.kind is FrameKind.ABORT:
                self._fail(PeerAbortedError(f"peer {self.peer} stopped: {frame.as_text()}", peer=self.peer))
                return
            if frame.kind is FrameKind.END:
                self._fail(PeerClosedError(f"peer {self.peer} finished and closed the link", peer=self.peer))
                return
            self._incoming.put(frame)

    def _note_bytes(self, count: int) -> None:
        self._last_seen = time.monotonic()

    def _shutdown_inbound(self) -> None:
        try:
            self._inbound.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
