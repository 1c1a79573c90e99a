"""Helpers shared by the benchmark scripts: peer processes and machine facts.

The scripts in this folder import it by name, because Python puts a script's
own folder first on `sys.path`.
"""

from __future__ import annotations

import os
import platform
import select
import subprocess
import sys
from pathlib import Path

from homesplit.pki import Household

__all__ = ["enroll_devices", "machine_facts", "read_line", "start", "stop"]

# How long a peer process gets to exit after SIGTERM, and then after SIGKILL.
_EXIT_SECONDS = 5.0


def start(command: list[str]) -> subprocess.Popen:
    """Start a peer process whose standard output and error the caller reads as text."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen) -> None:
    """Terminate `process` if it still runs, and kill it if it outlives the grace period."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_EXIT_SECONDS)


def read_line(process: subprocess.Popen, seconds: float, *, name: str) -> str:
    """Return the next line `process` prints, within `seconds`.

    Raises
    ------
    RuntimeError
        If no line arrives in time or the process exits first. The process is
        stopped, and the message names the process `name` and ends with its standard error.
    """
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    line = process.stdout.readline() if ready else ""
    if not line:
        stop(process)
        raise RuntimeError(f"{name} (pid {process.pid}) printed no line within {seconds} s: {process.stderr.read()[-2000:]}")
    return line


def enroll_devices(root: Path, household: str, devices: tuple[str, ...]) -> Path:
    """Create a household CA below `root`, enroll `devices`, and return the folder of their bundles."""
    authority = Household.create(root / "household", household)
    bundles = root / "bundles"
    for device in devices:
        authority.enroll(device, out=bundles / device)
    return bundles


def machine_facts(**extra: object) -> dict:
    """Return the command line and the machine facts that every benchmark report starts with."""
    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            **extra,
            # Other processes compete for the same cores, and the load shapes
            # CPU-bound figures such as TLS throughput.
            "load_average_1min_before": round(os.getloadavg()[0], 2),
        },
    }
