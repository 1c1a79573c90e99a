"""SIGTERM to the real ``homesplit sweep`` process stops every process the sweep started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from homesplit.process_tree import set_child_subreaper
from process_watch import ProcessWatcher

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"
# One household of two devices is the smallest experiment that still starts
# flwr-serverapp. The SuperLink's flower-superexec starts that process outside
# the SuperLink's session.
EXPERIMENT = f"""\
app: {APP}
rounds: 1
seed: 0
model: household_digits.task:build_model
example-shape: [1, 1, 8, 8]
households:
  - id: household-a
    devices:
      - {{name: laptop, holds-data: true}}
      - {{name: phone}}
"""
START_SECONDS = 120.0
STOP_SECONDS = 60.0


def _stop_survivors(watcher: ProcessWatcher) -> None:
    """Send SIGKILL to every recorded process that is still running, and reap it by PID."""
    for pid, process in watcher.seen.items():
        if not process.is_running():
            continue
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
        deadline = time.monotonic() + STOP_SECONDS
        try:
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                assert time.monotonic() < deadline, f"process {pid} still running {STOP_SECONDS} s after SIGKILL"
                time.sleep(0.01)
        except ChildProcessError:
            # Not a child of this process, so its own parent reaps it.
            pass


@pytest.mark.slow
def test_sweep_sigterm_leaves_no_process(tmp_path: Path) -> None:
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(EXPERIMENT, encoding="utf-8")
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), FLWR_TELEMETRY_ENABLED="0", TMPDIR=str(tmp_path))
    argv = [sys.executable, "-m", "homesplit.cli", "sweep", str(experiment), "--epsilon", "8", "--out", str(tmp_path / "out")]
    stderr_path = tmp_path / "stderr.txt"

    # As a subreaper, this process adopts every descendant that outlives the
    # CLI, so the watcher still finds it among this process's descendants.
    previous = set_child_subreaper(True)
    try:
        with ProcessWatcher(flower_only=False) as watcher, stderr_path.open("wb") as stderr:
            cli = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                deadline = time.monotonic() + START_SECONDS
                while "flwr-serverapp" not in watcher.programs:
                    assert cli.poll() is None, f"the sweep exited with {cli.returncode}: {stderr_path.read_text()}"
                    assert time.monotonic() < deadline, f"no flwr-serverapp within {START_SECONDS} s"
                    time.sleep(0.1)

                cli.send_signal(signal.SIGTERM)
                code = cli.wait(timeout=STOP_SECONDS)
                survivors = watcher.still_running()
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.wait(timeout=STOP_SECONDS)
                _stop_survivors(watcher)
    finally:
        set_child_subreaper(previous)

    assert survivors == []
    assert code == 128 + signal.SIGTERM
    assert "homesplit sweep: stopped by SIGTERM" in stderr_path.read_text()
