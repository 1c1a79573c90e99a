"""Validation of homesplit run's experiment files: every error names key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from homesplit.errors import ConfigError
from homesplit.experiment import load_experiment

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"

VALID = f"""
app: {APP}
rounds: 2
model: household_digits.task:build_model
example-shape: [1, 1, 8, 8]
households:
  - id: household-a
    devices: [{{name: laptop, holds-data: true}}, {{name: phone}}]
"""


def _load(tmp_path: Path, text: str):
    path = tmp_path / "experiment.yaml"
    path.write_text(text, encoding="utf-8")
    return load_experiment(path)


def test_valid_experiment_fills_defaults(tmp_path):
    experiment = _load(tmp_path, VALID)
    assert experiment.config["training"]["schedule"] == "1f1b"
    assert experiment.num_layers == 15
    assert experiment.app_dir == APP


def test_example_experiment_is_valid():
    experiment = load_experiment(APP / "experiment.yaml")
    assert len(experiment.households) == 3


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("rounds: 2", "rounds: 2\nepochs: 3"), "unknown key 'epochs'"),
        (("rounds: 2", "rounds: 2\ntraining: {lr: 0.1}"), "unknown key 'training.lr'"),
        (("{name: phone}", "{name: phone, colour: red}"), "unknown key"),
        (("{name: laptop, holds-data: true}", "{name: laptop}"), "0 data owners"),
        (("{name: phone}", "{name: phone, holds-data: true}"), "2 data owners"),
        (("rounds: 2", "rounds: 2\ntraining: {max-stages: 40}"), "training.max-stages=40 is invalid: the model has 15 layers"),
        ((f"app: {APP}", "app: /nonexistent/app"), "pyproject.toml not found"),
        (("rounds: 2", "rounds: 0"), "rounds=0 is invalid"),
        (("rounds: 2", "rounds: 2\ndata: {partitioner: shards}"), "data.partitioner='shards' is invalid; allowed: iid, dirichlet"),
        (("rounds: 2", "rounds: 2\ntraining: {schedule: zigzag}"), "training.schedule='zigzag' is invalid"),
        (("household_digits.task:build_model", "household_digits.task:missing"), "has no attribute"),
        (("{name: phone}", "{name: laptop}"), "repeats a device name"),
    ],
)
def test_invalid_experiment_rejected(tmp_path, change, expected):
    old, new = change
    assert old in VALID
    with pytest.raises(ConfigError, match=None) as info:
        _load(tmp_path, VALID.replace(old, new, 1))
    assert expected in str(info.value)


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_experiment(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)
    assert "not found" in str(info.value)


def test_more_devices_than_layers_rejected(tmp_path):
    devices = ", ".join(f"{{name: d{i}}}" for i in range(16))
    text = VALID.replace("{name: phone}", devices)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert "more stages than the model's 15 layers" in str(info.value)
