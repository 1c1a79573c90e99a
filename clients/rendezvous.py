"""Port exchange through files, for listeners bound to port 0 on one machine.

In simulation and in tests every device runs on one machine, so no port is
fixed. A downstream stage binds port 0 and writes the port it got to a file
named after the household, round, message kind and stage. Its upstream
neighbour polls for that file until a deadline and deletes it once read.

NOTE: the folder itself (one per run) stays in the temp folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from homesplit.errors import PeerTimeoutError

__all__ = ["publish_port", "wait_for_port"]

_POLL_SECONDS = 0.05


def _port_file(directory: Path, household: str, kind: str, server_round: int, stage: int) -> Path:
    return directory / f"{household}-{kind}-round{server_round}-stage{stage}.port"


def publish_port(directory: Path, household: str, kind: str, server_round: int, stage: int, port: int) -> Path:
    """Write `port` atomically and return the file's path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = _port_file(directory, household, kind, server_round, stage)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(str(port))
    temporary.replace(path)
    return path


def wait_for_port(directory: Path, household: str, kind: str, server_round: int, stage: int, *, timeout: float) -> int:
    """Return the port that `stage` published, waiting at most `timeout` seconds.

    Raises
    ------
    PeerTimeoutError
        If the stage has not published a port by then, usually because its
        ClientApp has not started.
    """
    path = _port_file(directory, household, kind, server_round, stage)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            port = int(path.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(_POLL_SECONDS)
            continue
        path.unlink(missing_ok=True)
        return port
    raise PeerTimeoutError(
        f"stage {stage} of household {household} published no listening port in {path} within {timeout:.0f} s",
        peer=f"{household}/stage{stage}",
    )
