"""Loopback sockets and bounded threads shared by the link and frame tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

# Connecting on loopback takes microseconds, so this bounds only a broken setup.
CONNECT_SECONDS = 5.0


def tcp_pair(*, buffer_bytes: int | None = None, dialed_timeout: float | None = None) -> tuple[socket.socket, socket.socket]:
    """Return (dialed, accepted) TCP sockets connected on 127.0.0.1.

    Parameters
    ----------
    buffer_bytes : int or None, default None
        Kernel buffer size: the listener's receive buffer and the dialed
        socket's send buffer, set before connecting so that the TCP window is
        small from the start. None keeps the kernel's sizes.
    dialed_timeout : float or None, default None
        Timeout of the dialed socket afterwards. The accepted socket blocks
        without a timeout.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dialed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if buffer_bytes is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
            dialed.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        dialed.settimeout(CONNECT_SECONDS)
        dialed.connect(listener.getsockname())
        listener.settimeout(CONNECT_SECONDS)
        accepted, _ = listener.accept()
    except BaseException:
        dialed.close()
        raise
    finally:
        listener.close()
    dialed.settimeout(dialed_timeout)
    accepted.settimeout(None)
    return dialed, accepted


def run_in_thread(call: Callable[[], object], *, wait: float) -> object:
    """Run `call` in a daemon thread and return its result or the exception it raised.

    Fails the test if `call` still runs after `wait` seconds.
    """
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=wait)
    assert not thread.is_alive(), f"still running after {wait} s"
    return outcome[0]
