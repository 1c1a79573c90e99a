"""Discovery measures household links over mutual TLS in a real local Flower federation.

A real flower-superlink and one flower-supernode per device run on loopback
through `homesplit run`'s own code path, with the "time" planner, so the
strategy probes every household's links before it plans.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from homesplit.cli_run import run_experiment
from homesplit.experiment import load_experiment
from process_watch import ProcessWatcher

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"

EXPERIMENT = f"""
app: {APP}
rounds: 1
model: household_digits.task:build_model
example-shape: [1, 1, 8, 8]
households:
  - id: household-a
    devices: [{{name: laptop, holds-data: true}}, {{name: phone}}, {{name: tv}}]
training: {{local-epochs: 1, batch-size: 32}}
planner: {{objective: time, link-probe-seconds: 20}}
timeouts: {{startup: 120, round: 240, connect: 60, run: 400}}
"""

MEASURED = re.compile(r"Household household-a: link laptop -> (\w+) over mutual TLS: ([0-9.e+-]+) MB/s, latency ([0-9.e+-]+) ms")


@pytest.mark.slow
def test_discovery_measures_links_over_tls(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text(EXPERIMENT, encoding="utf-8")
    lines: list[str] = []
    with ProcessWatcher() as watcher:
        run_experiment(load_experiment(path), out=tmp_path / "out", echo=lines.append)

    log = "\n".join(lines)
    measured = {match[1]: (float(match[2]), float(match[3])) for match in MEASURED.finditer(log)}
    assert sorted(measured) == ["phone", "tv"], log[-3000:]
    for peer, (megabytes_per_second, latency_ms) in measured.items():
        assert megabytes_per_second > 1, f"{peer}: {megabytes_per_second} MB/s"
        assert 0 <= latency_ms < 100, f"{peer}: {latency_ms} ms"
    assert "not measured" not in log
    assert "default link" not in log
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["rounds"][0]["households_trained"] == ["household-a"]
    assert watcher.still_running() == []
