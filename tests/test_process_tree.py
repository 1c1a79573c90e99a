"""Tests of ProcessTracker.stop_all with real processes."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from homesplit.process_tree import ManagedProcess, ProcessTracker, _describe_process

# The component starts a child in its own session and then sleeps. The child
# ignores SIGTERM, as Flower's flower-superexec often does for seconds, and
# creates the file argv[1] once it does.
STUBBORN_CHILD = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', "
    "'import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "pathlib.Path(sys.argv[1]).touch(); time.sleep(120)', sys.argv[1]])\n"
    "time.sleep(120)\n"
)
STUBBORN_COMPONENT = (
    "import pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "pathlib.Path(sys.argv[1]).touch()\n"
    "time.sleep(120)\n"
)


def start_component(tmp_path: Path, name: str, script: str) -> ProcessTracker:
    """Start `script` as a tracked component and return once it or its child ignores SIGTERM."""
    ready = tmp_path / f"{name}.ready"
    tracker = ProcessTracker()
    process = ManagedProcess(name, [sys.executable, "-c", script, str(ready)], log_path=tmp_path / f"{name}.log", env={})
    process.start()
    tracker.add(process)
    deadline = time.monotonic() + 30.0
    while not ready.exists():
        assert time.monotonic() < deadline, f"{name} did not start within 30 s"
        time.sleep(0.05)
    return tracker


def test_stop_all_kills_stubborn_child_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = start_component(tmp_path, "component", STUBBORN_CHILD)
    child = next(pid for pid in tracker.live_members() if pid != tracker.processes[0].pid)

    caplog.set_level(logging.DEBUG, logger="homesplit.process_tree")
    started = time.monotonic()
    survivors = tracker.stop_all(grace=10.0, child_grace=0.5)
    seconds = time.monotonic() - started

    assert survivors == []
    assert tracker.live_members() == []
    assert seconds < 5.0
    killed = [r for r in caplog.records if "sending SIGKILL" in r.getMessage()]
    assert [r.levelno for r in killed] == [logging.DEBUG]
    assert f"(PID {child})" in killed[0].getMessage()
    assert "-c import pathlib, signal" in killed[0].getMessage()


def test_stop_all_warns_for_stubborn_component(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = start_component(tmp_path, "stubborn component", STUBBORN_COMPONENT)

    caplog.set_level(logging.INFO, logger="homesplit.process_tree")
    survivors = tracker.stop_all(grace=0.5, child_grace=0.5)

    assert survivors == []
    assert tracker.processes[0].exit_code() == -9
    killed = [r for r in caplog.records if "sending SIGKILL" in r.getMessage()]
    assert [r.levelno for r in killed] == [logging.WARNING]
    assert killed[0].getMessage().startswith("stubborn component (PID ")


def describe_when(pid: int, expected: str | None, timeout: float = 10.0) -> str | None:
    """Return `_describe_process(pid)` once it equals `expected`, or its last value after `timeout` seconds.

    Right after fork a child still shows this process's command line, and a
    killed child needs a moment to become a zombie.
    """
    deadline = time.monotonic() + timeout
    while _describe_process(pid) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return _describe_process(pid)


def test_describe_process_names_program_or_none() -> None:
    process = subprocess.Popen(["sleep", "30"])
    try:
        assert describe_when(process.pid, "sleep 30") == "sleep 30"
        process.kill()
        # Killed but not yet reaped, the zombie counts as exited.
        assert describe_when(process.pid, None) is None
        assert process.poll() == -9
    finally:
        process.kill()
        process.wait()


def test_describe_process_drops_python_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "flower-superexec"
    script.write_text("import time\ntime.sleep(30)\n")
    for argv, expected in (
        ([sys.executable, str(script), "--insecure"], "flower-superexec --insecure"),
        ([sys.executable, "-c", "import time; time.sleep(30)"], f"{Path(sys.executable).name} -c import time; time.sleep(30)"),
    ):
        process = subprocess.Popen(argv)
        try:
            assert describe_when(process.pid, expected) == expected
        finally:
            process.kill()
            process.wait()
