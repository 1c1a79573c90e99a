"""End-to-end runs of household-digits in a real local Flower federation with TLS.

Each test starts a real flower-superlink and one flower-supernode per device
on loopback through `homesplit run`'s own code path, and checks that every
process it started is gone afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from homesplit import cli_run
from homesplit.cli_run import run_experiment
from homesplit.errors import TrainingError
from homesplit.experiment import load_experiment

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"


def _write_experiment(tmp_path: Path, rounds: int) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(
        f"""
app: {APP}
rounds: {rounds}
seed: 0
model: household_digits.task:build_model
example-shape: [1, 1, 8, 8]
households:
  - id: household-a
    devices: [{{name: laptop, holds-data: true}}, {{name: phone}}]
  - id: household-b
    devices: [{{name: laptop, holds-data: true}}, {{name: phone}}]
training: {{local-epochs: 2, batch-size: 32, optimizer: {{name: SGD, lr: 0.05, momentum: 0.9}}}}
timeouts: {{startup: 120, round: 240, connect: 60, run: 400}}
""",
        encoding="utf-8",
    )
    return path


def _own_flower_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(Path(arg).name.startswith(("flower-", "flwr")) for arg in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_deployment_tls_two_households_two_rounds(tmp_path):
    experiment = load_experiment(_write_experiment(tmp_path, rounds=2))
    lines: list[str] = []
    summary = run_experiment(experiment, out=tmp_path / "out", echo=lines.append)

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for record in results["rounds"]:
        assert record["households_trained"] == ["household-a", "household-b"]
        assert record["households_failed"] == {}
        assert record["link_bytes"] > 0
        assert record["train_loss"] is not None
        assert record["plans"]["household-a"]["stages"] == ["laptop", "phone"]
    assert summary["tls"] is True
    assert summary["training_status"] == "trained"
    assert summary["rounds_with_training"] == [1, 2]
    assert summary["files_kept"] is None
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.3
    assert results["config"]["households"][0]["id"] == "household-a"
    assert (tmp_path / "out" / "metrics.csv").read_text().startswith("round,households_trained")
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    assert _own_flower_processes() == []


def _live_clientapps(supernode: psutil.Process) -> list[psutil.Process]:
    """Return the running (not zombie) flwr-clientapp processes under `supernode`."""
    found = []
    for proc in supernode.children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "flwr-clientapp" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class _DeviceKiller:
    """Kill the ClientApp process of one device once its household's train round has started."""

    def __init__(self, household: str, device: str) -> None:
        self.household = household
        self.device = device
        self.killed: list[int] = []
        self._armed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def on_log(self, line: str) -> None:
        # The strategy logs the plan right before it sends the train messages.
        if f"Household {self.household}:" in line and "stages" in line and not self.killed:
            self._armed.set()

    def _supernode(self) -> tuple[psutil.Process, int] | None:
        """Return the device's flower-supernode and the data-plane port from its node config."""
        for proc in psutil.Process().children(recursive=True):
            try:
                command = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if "flower-supernode" in command and f"'{self.household}'" in command and f"device='{self.device}'" in command:
                return proc, int(re.search(r"listen='[^']*:(\d+)'", command).group(1))
        return None

    def _run(self) -> None:
        if not self._armed.wait(timeout=300):
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self._stop.is_set():
            found = self._supernode()
            for proc in [] if found is None else _live_clientapps(found[0]):
                # Kill once its upstream neighbour is connected, so the stage
                # dies in the middle of the pipeline, not while importing.
                try:
                    connected = any(
                        c.status == psutil.CONN_ESTABLISHED and c.laddr.port == found[1] for c in proc.net_connections("tcp")
                    )
                except psutil.Error:
                    continue
                if connected:
                    proc.send_signal(signal.SIGKILL)
                    self.killed.append(proc.pid)
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._armed.set()
        self._thread.join(timeout=10)


@pytest.mark.slow
def test_killed_device_drops_only_its_household(tmp_path):
    experiment = load_experiment(_write_experiment(tmp_path, rounds=2))
    killer = _DeviceKiller("household-b", "phone")
    lines: list[str] = []

    def on_log(line: str) -> None:
        lines.append(line)
        killer.on_log(line)

    try:
        run_experiment(experiment, out=tmp_path / "out", echo=on_log)
    finally:
        killer.close()

    assert killer.killed, "the phone's ClientApp was never seen running"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    first, second = results["rounds"]
    assert first["households_trained"] == ["household-a"]
    assert list(first["households_failed"]) == ["household-b"]
    assert "phone" in first["households_failed"]["household-b"]
    assert second["households_trained"] == ["household-a", "household-b"]
    log = "\n".join(lines)
    assert "household household-b dropped: device phone failed" in log
    assert _own_flower_processes() == []


@pytest.mark.slow
def test_run_without_training_fails_and_keeps_files(tmp_path):
    experiment = load_experiment(_write_experiment(tmp_path, rounds=1))
    # The loader rejects this name, so it is set after loading, as a stage
    # failure that the loader cannot foresee would be.
    experiment.config["training"]["optimizer"] = {"name": "Adamm", "lr": 0.01}
    lines: list[str] = []

    with pytest.raises(TrainingError) as info:
        run_experiment(experiment, out=tmp_path / "out", keep_files=True, echo=lines.append)

    summary = info.value.summary
    root = Path(summary["files_kept"])
    try:
        message = str(info.value)
        assert message.startswith("no household trained in the only round")
        assert "  household-a: device laptop in round 1:" in message
        assert "'Adamm'" in message
        assert str(tmp_path / "out") in message

        results = json.loads((tmp_path / "out" / "results.json").read_text())
        assert results["summary"]["training_status"] == "no household trained"
        assert results["summary"]["rounds_with_training"] == []
        assert results["summary"]["error"] in message
        assert set(results["summary"]["household_failures"]) == {"household-a", "household-b"}
        [record] = results["rounds"]
        assert record["households_trained"] == []
        assert record["plans"]["household-a"]["stages"] == ["laptop", "phone"]
        assert len(record["plans"]["household-b"]["cuts"]) == 1
        assert (tmp_path / "out" / "metrics.csv").is_file()
        assert (tmp_path / "out" / "accuracy.png").is_file()

        plan_lines = [line for line in lines if cli_run._SHOWN.search(line) and "stages ['laptop', 'phone']" in line]
        assert len(plan_lines) == 2, lines

        assert (root / "households" / "household-a" / "bundles" / "laptop").is_dir()
        [workdir] = root.glob("homesplit-federation-*")
        assert (workdir / "logs" / "superlink.log").is_file()
        assert _own_flower_processes() == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
