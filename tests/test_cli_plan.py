"""``homesplit plan``: the table, the JSON, and rejection of invalid devices files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from homesplit.cli import main
from homesplit.planner import ModelProfile, Plan, brute_force, load_devices

CNN = ["--model", "homesplit.models:groupnorm_cnn", "--example-shape", "1", "8", "8", "--batch-size", "16"]

DEVICES = """\
- name: laptop
  speed: 1.0
  memory: 1GiB
  idle_watts: 6
  busy_watts: 30
  links:
    pi: {bandwidth: 1Gbit/s, latency: 50us}
- name: pi
  speed: 0.25
  memory: 256MiB
  idle_watts: 2
  busy_watts: 6
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A profile cache shared by the tests, so the model is profiled once."""
    return tmp_path_factory.mktemp("profiles") / "profiles.json"


def _devices(tmp_path: Path, text: str = DEVICES) -> Path:
    path = tmp_path / "devices.yaml"
    path.write_text(text)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", "plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_prints_table(tmp_path, cache, capsys):
    code, out, _ = _run(capsys, *CNN, "--devices", str(_devices(tmp_path)), "--cache", str(cache))

    assert code == 0
    header = out.splitlines()[0].split()
    assert header[:3] == ["stage", "device", "layers"]
    for column in ("parameters", "memory", "compute", "transfer", "energy"):
        assert column in header
    assert "predicted step:" in out


def test_plan_json_round_trips(tmp_path, cache, capsys):
    code, out, _ = _run(capsys, *CNN, "--devices", str(_devices(tmp_path)), "--cache", str(cache), "--json")

    plan = Plan.from_dict(json.loads(out))
    assert code == 0
    assert plan.batch_size == 16
    assert set(plan.devices) | set(plan.idle_devices) == {"laptop", "pi"}


def test_plan_equals_brute_force(tmp_path, cache, capsys):
    devices = _devices(tmp_path)
    out_path = tmp_path / "plan.json"
    code, _, _ = _run(
        capsys, *CNN, "--devices", str(devices), "--cache", str(cache), "--out", str(out_path), "--objective", "energy"
    )
    plan = Plan.from_json(out_path.read_text())
    profile = ModelProfile.from_dict(next(iter(json.loads(cache.read_text()).values())))
    household = load_devices(devices)

    reference = brute_force(profile.layers, household.devices, household.links, batch_size=16, objective="energy")

    assert code == 0
    assert plan.energy_joules_per_sample == pytest.approx(reference.energy_joules_per_sample, rel=1e-9)


def test_plan_memory_limit_forces_split(tmp_path, cache, capsys):
    # The CNN's parameters, gradients and Adam state alone take about 370 kB.
    text = """\
a: {speed: 1.0, memory: 300KiB}
b: {speed: 1.0, memory: 300KiB}
c: {speed: 1.0, memory: 300KiB}
"""
    code, out, _ = _run(capsys, *CNN, "--devices", str(_devices(tmp_path, text)), "--cache", str(cache), "--json")

    plan = Plan.from_dict(json.loads(out))
    assert code == 0
    assert plan.num_stages >= 2
    assert all(stage.memory_bytes <= 300 * 1024 for stage in plan.stages)


def test_plan_no_fit_names_largest_unit(tmp_path, cache, capsys):
    text = "a: {speed: 1.0, memory: 1KiB}\n"
    code, _, err = _run(capsys, *CNN, "--devices", str(_devices(tmp_path, text)), "--cache", str(cache))

    assert code == 2
    assert "largest unit" in err
    assert "1024 bytes on 'a'" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: {speed: 1.0, memory: -5MiB}\n", ["'memory'", "'-5MiB'"]),
        ("a: {speed: 1.0, memory: 1GiB, colour: red}\n", ["'colour'", "'red'"]),
        ("- {name: a, speed: 1.0, memory: 1GiB}\n- {name: a, speed: 0.5, memory: 1GiB}\n", ["'a'", "twice"]),
        ("a: {speed: 0, memory: 1GiB}\n", ["'speed'", "0"]),
        ("a: {speed: 1.0}\n", ["'memory'", "missing"]),
    ],
    ids=["negative-memory", "unknown-key", "duplicate-name", "zero-speed", "missing-memory"],
)
def test_plan_rejects_invalid_devices(tmp_path, capsys, text, expected):
    path = _devices(tmp_path, text)

    code, out, err = _run(capsys, *CNN, "--devices", str(path))

    assert code == 2
    assert out == ""
    assert str(path) in err
    for fragment in expected:
        assert fragment in err


def test_plan_rejects_missing_devices_file(tmp_path, capsys):
    code, _, err = _run(capsys, *CNN, "--devices", str(tmp_path / "absent.yaml"))

    assert code == 2
    assert "absent.yaml" in err


def test_plan_rejects_invalid_model_kwargs(tmp_path, capsys):
    code, _, err = _run(capsys, *CNN, "--devices", str(_devices(tmp_path)), "--model-kwargs", "[1, 2]")

    assert code == 2
    assert "--model-kwargs" in err


def test_plan_transformer_with_tokens(tmp_path, capsys):
    argv = ["--model", "homesplit.models:tiny_transformer", "--example-shape", "12", "--example-dtype", "int64"]

    code, out, _ = _run(capsys, *argv, "--devices", str(_devices(tmp_path)), "--json", "--data-owner", "pi")

    plan = Plan.from_dict(json.loads(out))
    assert code == 0
    assert plan.stages[0].device == "pi"


def _app_with_model(folder: Path, module: str) -> Path:
    """Write a folder with `module`.py whose build() returns a two-layer MLP, like a Flower app's task module."""
    folder.mkdir()
    (folder / f"{module}.py").write_text(
        "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
    )
    return folder


def test_plan_imports_model_from_current_folder(tmp_path, capsys, monkeypatch):
    app = _app_with_model(tmp_path / "app", "plan_app_cwd_task")
    devices = _devices(tmp_path)
    monkeypatch.chdir(app)
    path_before = list(sys.path)

    code, out, err = _run(capsys, "--model", "plan_app_cwd_task:build", "--example-shape", "4", "--devices", str(devices), "--json")

    assert code == 0, err
    assert Plan.from_dict(json.loads(out)).batch_size == 32
    assert sys.path == path_before


def test_plan_imports_model_from_app_dir(tmp_path, capsys):
    app = _app_with_model(tmp_path / "app", "plan_app_dir_task")
    argv = ["--app-dir", str(app), "--model", "plan_app_dir_task:build", "--example-shape", "4"]

    code, out, err = _run(capsys, *argv, "--devices", str(_devices(tmp_path)), "--json")

    assert code == 0, err
    assert Plan.from_dict(json.loads(out)).batch_size == 32


def test_plan_missing_module_says_how_to_fix(tmp_path, capsys):
    app = _app_with_model(tmp_path / "app", "plan_app_other_task")
    argv = ["--app-dir", str(app), "--model", "plan_app_missing.task:build", "--example-shape", "4"]

    code, _, err = _run(capsys, *argv, "--devices", str(_devices(tmp_path)))

    assert code == 2
    assert "No module named 'plan_app_missing'" in err
    assert f"in --app-dir {app}" in err
    assert "pass that folder as --app-dir" in err


def test_plan_rejects_missing_app_dir(tmp_path, capsys):
    argv = ["--app-dir", str(tmp_path / "absent"), *CNN]

    code, _, err = _run(capsys, *argv, "--devices", str(_devices(tmp_path)))

    assert code == 2
    assert f"--app-dir '{tmp_path / 'absent'}' is not a folder" in err
