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


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        ("{name: Adamm, lr: 0.01}", "training.optimizer.name='Adamm' is not a torch.optim optimizer; allowed: ASGD,"),
        ("{name: LBFGS, lr: 0.01}", "training.optimizer.name='LBFGS' is invalid, because its step() needs a closure"),
        ("{name: SGD, lr: 0.1, momentun: 0.9}", "unexpected keyword argument 'momentun'; SGD accepts lr, momentum"),
        ("{name: SGD, lr: -0.1}", "training.optimizer.lr=-0.1 is invalid; allowed: a positive, finite number"),
        ("{name: SGD, lr: '0.1'}", "training.optimizer.lr='0.1' is invalid"),
        ("{name: SGD, lr: 0.1, nesterov: true}", "Nesterov momentum requires a momentum"),
        ("{lr: 0.1}", "training.optimizer={'lr': 0.1} is invalid; allowed: a mapping such as {name: SGD"),
    ],
)
def test_invalid_optimizer_rejected(tmp_path, optimizer, expected):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, VALID + f"training: {{optimizer: {optimizer}}}\n")
    assert expected in str(info.value)


def test_unknown_optimizer_lists_every_allowed_name(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, VALID + "training: {optimizer: {name: Adamm, lr: 0.01}}\n")
    for name in ("Adam", "AdamW", "SGD", "RMSprop"):
        assert name in str(info.value)
    assert "LBFGS" not in str(info.value)


def test_optimizer_name_ignores_case(tmp_path):
    experiment = _load(tmp_path, VALID + "training: {optimizer: {name: adamw, lr: 0.001, weight_decay: 0.01}}\n")
    assert experiment.config["training"]["optimizer"]["name"] == "adamw"


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


POWERED = VALID.replace("{name: laptop, holds-data: true}", "{name: laptop, holds-data: true, idle-watts: 6, busy-watts: 35}").replace(
    "{name: phone}", "{name: phone, idle-watts: 0.5, busy-watts: 4}"
)


def test_planner_defaults_to_balanced(tmp_path):
    experiment = _load(tmp_path, VALID)
    assert experiment.config["planner"] == {"objective": "balanced", "link-probe-seconds": 30.0}


def test_planner_reaches_run_config(tmp_path):
    from homesplit.cli_run import run_config, supernode_specs

    experiment = _load(tmp_path, POWERED + "planner: {objective: energy, link-probe-seconds: 12}\n")
    overrides = run_config(experiment, tmp_path / "results.json")
    assert overrides["planner"] == "energy"
    assert overrides["link-probe-seconds"] == 12.0
    laptop = supernode_specs(experiment, None)[0].node_config
    assert (laptop["idle-watts"], laptop["busy-watts"]) == (6.0, 35.0)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("planner: {objective: fastest}", "planner.objective='fastest' is invalid; allowed: balanced, time, energy"),
        ("planner: {goal: time}", "unknown key 'planner.goal'"),
        ("planner: time", "planner='time' must be a mapping"),
        ("planner: {link-probe-seconds: 0}", "planner.link-probe-seconds=0 is invalid"),
        ("planner: {link-probe-seconds: .inf}", "planner.link-probe-seconds=inf is invalid"),
        ("planner: {objective: energy}", "household household-a has none on ['laptop', 'phone']; add them"),
    ],
)
def test_invalid_planner_rejected(tmp_path, extra, expected):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, VALID + extra + "\n")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("{name: phone, idle-watts: 2}", "gives only idle-watts=2; give both idle-watts and busy-watts"),
        ("{name: phone, idle-watts: 5, busy-watts: 3}", "busy-watts=3 is below idle-watts=5"),
        ("{name: phone, idle-watts: -1, busy-watts: 3}", "idle-watts=-1 is invalid"),
        ("{name: phone, idle-watts: true, busy-watts: 3}", "idle-watts=True is invalid"),
    ],
)
def test_invalid_device_watts_rejected(tmp_path, device, expected):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, VALID.replace("{name: phone}", device))
    assert expected in str(info.value)
