"""A TLS connection driven through memory BIOs, with the socket calls of a stream socket.

`TlsStream` runs OpenSSL on an `ssl.SSLObject` and moves the ciphertext
between a plain TCP socket and two `ssl.MemoryBIO` buffers itself. It offers
the socket methods that `homesplit.link` and `homesplit.transport` use
(`sendall`, `recv_into`, `settimeout`, `shutdown`, `close`, ...), so a
`SocketLink` runs over it unchanged.

Why not `ssl.SSLSocket`: it lets OpenSSL read the socket, and OpenSSL reads
each TLS record with two system calls (its 5-byte header, then its body) and
writes each 16 KiB record with one. A 1 MiB tensor then costs about 190
system calls. Here a receive reads up to `_READ_BYTES` of ciphertext in one
call and a send writes up to `_WRITE_BYTES` in one, which cut the CPU time per
received MiB by about a fifth on the development machine (see
docs/benchmarks.md, "Link throughput").

One `TlsStream` must be used by one thread at a time, like `ssl.SSLSocket`:
`SocketLink` gives each direction its own connection and thread.

The socket timeout bounds a whole `handshake` or `recv_into` call, not each
socket read inside it, so a peer that trickles ciphertext one byte at a time
still times out.
"""

from __future__ import annotations

import socket
import ssl
import time

__all__ = ["TlsStream"]

# Ciphertext read per system call. Larger reads mean fewer calls; the socket's
# receive buffer rarely holds more than this at once on a home network.
_READ_BYTES = 256 << 10

# Plaintext encrypted per socket write: large enough that system calls are
# rare, small enough that the outgoing buffer never holds a second copy of a
# whole 16 MiB tensor.
_WRITE_BYTES = 256 << 10


class TlsStream:
    """A client or server TLS connection over a connected TCP socket.

    Build one with `TlsStream.handshake`, which returns only after the TLS
    handshake succeeded.

    Parameters
    ----------
    sock : socket.socket
        The connected TCP socket. The stream owns it from now on.
    tls : ssl.SSLObject
        OpenSSL state bound to `incoming` and `outgoing`.
    incoming, outgoing : ssl.MemoryBIO
        Ciphertext received from and still to be sent to the peer.
    """

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._sock = sock
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self._buffer = bytearray(_READ_BYTES)
        self._view = memoryview(self._buffer)
        self._eof = False
        # Ciphertext taken from `outgoing` that a non-blocking send left over.
        self._unsent = b""

    @classmethod
    def handshake(cls, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool) -> TlsStream:
        """Run the TLS handshake on `sock` and return the stream.

        `sock`'s timeout bounds the whole handshake.

        Raises
        ------
        ssl.SSLError
            If the handshake fails. The alert that tells the peer why has been
            sent, as far as the socket still accepts data.
        OSError
            If the socket fails or times out, or the peer closes it first.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=server_side)
        stream = cls(sock, tls, incoming, outgoing)
        deadline = _deadline(sock)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                stream._flush()
                if not stream._fill(deadline):
                    raise ConnectionResetError("the peer closed the connection during the TLS handshake") from None
            except ssl.SSLError:
                # The peer learns the reason only from the alert OpenSSL left
                # in the outgoing buffer.
                try:
                    stream._flush()
                except OSError:
                    pass
                raise
        stream._flush()
        return stream

    # -- the socket calls that links and transports use ---------------------------------

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data` and write all of it, like `socket.socket.sendall`."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _WRITE_BYTES):
            self._tls.write(view[start : start + _WRITE_BYTES])
            self._flush()

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Encrypt `data` and write as much of it as the socket takes without waiting.

        Returns
        -------
        bool
            True if everything went out. False if ciphertext is left over;
            then `flush` must run before any other write.
        """
        self._flush_nowait()
        if self._unsent:
            raise RuntimeError("TlsStream.send_nowait called while ciphertext is left over; call flush first")
        self._tls.write(data)
        return self._flush_nowait()

    def flush(self) -> None:
        """Write the ciphertext that `send_nowait` left over, waiting as long as needed."""
        self._flush()

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        """Decrypt up to `nbytes` (all of `buffer` if 0) into `buffer`; 0 means the peer closed.

        The socket timeout bounds the whole call, however many socket reads it takes.
        """
        view = memoryview(buffer).cast("B")
        # Check `nbytes` as socket.recv_into does, with its messages, because
        # returning 0 here would read as a closed connection.
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes > len(view):
            raise ValueError("buffer too small for requested bytes")
        wanted = nbytes or len(view)
        deadline = _deadline(self._sock)
        read = self._tls.read
        received = 0
        while True:
            try:
                # Decrypt every whole record already buffered before
                # returning. OpenSSL returns at most one 16 KiB record per
                # read, so returning each would run the caller's loop 64 times
                # per MiB.
                while received < wanted:
                    count = read(wanted - received, view[received:])
                    if not count:
                        # SSLObject.read returns 0 bytes, rather than raising,
                        # when the peer has sent close_notify.
                        break
                    received += count
                return received
            except ssl.SSLWantReadError:
                if received:
                    return received
                if self._eof or not self._fill(deadline):
                    # Like SSLSocket with suppress_ragged_eofs: an end without
                    # close_notify reads as a closed connection; the frame
                    # decoder reports a frame cut short.
                    return 0
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # Return the plaintext decrypted before the end, and the
                # next call returns 0.
                return received
            finally:
                # Reading can make OpenSSL answer, with a key update for one.
                if self._outgoing.pending:
                    self._flush()

    def settimeout(self, value: float | None) -> None:
        """Set the timeout of every later socket call."""
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        """Return the socket timeout."""
        return self._sock.gettimeout()

    def getpeername(self):
        """Return the peer's address."""
        return self._sock.getpeername()

    def getsockname(self):
        """Return the local address."""
        return self._sock.getsockname()

    def fileno(self) -> int:
        """Return the socket's file descriptor."""
        return self._sock.fileno()

    def setsockopt(self, *args) -> None:
        """Set a socket option on the TCP socket."""
        self._sock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        """Shut the TCP socket down, which wakes a thread blocked in `recv_into`."""
        self._sock.shutdown(how)

    def close(self) -> None:
        """Close the TCP socket without a close_notify, as `ssl.SSLSocket.close` does."""
        self._sock.close()

    # -- TLS details ---------------------------------------------------------------------

    def getpeercert(self, binary_form: bool = False):
        """Return the peer's certificate; see `ssl.SSLSocket.getpeercert`."""
        return self._tls.getpeercert(binary_form)

    def version(self) -> str | None:
        """Return the negotiated protocol version, for example ``"TLSv1.3"``."""
        return self._tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        """Return the negotiated cipher suite, protocol and secret bits."""
        return self._tls.cipher()

    def __enter__(self) -> TlsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- moving ciphertext ---------------------------------------------------------------

    def _flush(self) -> None:
        if self._unsent:
            self._sock.sendall(self._unsent)
            self._unsent = b""
        while self._outgoing.pending:
            self._sock.sendall(self._outgoing.read())

    def _flush_nowait(self) -> bool:
        if not self._unsent and self._outgoing.pending:
            self._unsent = self._outgoing.read()
        if not self._unsent:
            return True
        try:
            sent = self._sock.send(self._unsent, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        self._unsent = self._unsent[sent:]
        return not self._unsent and not self._outgoing.pending

    def _fill(self, deadline: float | None) -> bool:
        """Read ciphertext from the socket into the incoming buffer; False at end of stream.

        Raises TimeoutError if nothing arrives before the `time.monotonic` time `deadline`.
        """
        if deadline is None:
            received = self._sock.recv_into(self._view)
        else:
            timeout = self._sock.gettimeout()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for ciphertext from the peer")
            self._sock.settimeout(remaining)
            try:
                received = self._sock.recv_into(self._view)
            finally:
                self._sock.settimeout(timeout)
        if received == 0:
            self._eof = True
            self._incoming.write_eof()
            return False
        self._incoming.write(self._view[:received])
        return True


def _deadline(sock: socket.socket) -> float | None:
    """Return the `time.monotonic` time at which `sock`'s timeout, counted from now, ends."""
    timeout = sock.gettimeout()
    # A timeout of 0 makes the socket non-blocking, which needs no deadline.
    return time.monotonic() + timeout if timeout else None
