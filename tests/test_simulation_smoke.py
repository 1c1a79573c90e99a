"""The echo app under Flower's Ray simulation engine, through LocalFederation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from homesplit.federation import LocalFederation, SimulationSpec
from process_watch import ProcessWatcher

ECHO_APP = Path(__file__).parent / "apps" / "echo_app"

pytest.importorskip("ray", reason="the simulation engine needs flwr[simulation]")


@pytest.fixture(autouse=True)
def flower_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep Flower's files in a temporary FLWR_HOME and its telemetry off."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.mark.slow
def test_simulation_runs_echo_app_concurrently(tmp_path: Path) -> None:
    num_supernodes = 4
    train_sleep = 2.0
    # Four Ray CPUs of one each let all four ClientApps run at once, even on a
    # two-core machine: they mostly sleep.
    simulation = SimulationSpec(num_supernodes=num_supernodes, clientapp_cpus=1, ray_cpus=num_supernodes)

    with ProcessWatcher(flower_only=False) as watcher, LocalFederation(
        simulation=simulation, root_dir=tmp_path
    ) as federation:
        result = federation.run(
            ECHO_APP,
            run_config={
                "result-path": str(tmp_path / "result.json"),
                "expected-nodes": num_supernodes,
                "train-rounds": 2,
                "train-sleep": train_sleep,
            },
            timeout=400,
        )

    assert result.status == "finished:completed"
    echoed = json.loads((tmp_path / "result.json").read_text())
    node_configs = [reply["node_config"] for reply in echoed["query"]["replies"].values()]
    assert sorted(config["partition-id"] for config in node_configs) == list(range(num_supernodes))
    assert {config["num-partitions"] for config in node_configs} == {num_supernodes}

    for round_number, train in enumerate(echoed["train"], start=1):
        assert len(train["replies"]) == num_supernodes
        # One after another, the sleeps alone would take 4 x 2 s = 8 s.
        assert train["seconds"] < 2 * train_sleep, f"ClientApps did not run concurrently: {train['seconds']} s"
        for reply in train["replies"].values():
            # Context.state persists per simulated node across messages.
            assert reply["metrics"]["train-calls"] == round_number

    assert "flwr-simulation" in watcher.programs
    assert watcher.still_running() == []
