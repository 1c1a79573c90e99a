"""Hostile configuration files: devices.yaml, pipeline job JSON, tensor files,
household folders and experiment files. Each must fail with a ConfigError or
FrameError that names the value, never with a raw exception or a long stall.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from homesplit.errors import ConfigError, FrameError
from homesplit.experiment import load_experiment
from homesplit.job import PipelineJob
from homesplit.pki import Household
from homesplit.planner.devices import load_devices
from homesplit.tensorfile import load_tensors, save_tensors

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"

# Eight levels of nine aliases each: 9**8 (about 43 million) elements once expanded.
ALIAS_BOMB = "[&l0 [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]" for level in range(1, 8)
) + "]"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "case, text, expected",
    [
        ("not utf-8", b"- name: a\n  speed: 1\n  memory: 1GiB # \xff\n", "not UTF-8"),
        ("integer too large", b"- name: a\n  speed: " + b"9" * 400 + b"\n  memory: 1GiB\n", "'speed'"),
        ("memory overflows", b"- name: a\n  speed: 1\n  memory: 1e300TiB\n", "'memory'"),
        (
            "bandwidth overflows",
            b"- {name: a, speed: 1, memory: 1GiB, links: {b: {bandwidth: 1e308GB/s, latency: 1ms}}}\n"
            b"- {name: b, speed: 1, memory: 1GiB}\n",
            "'bandwidth'",
        ),
    ],
)
def test_devices_bad_file_rejected(tmp_path: Path, case: str, text: bytes, expected: str) -> None:
    path = _write(tmp_path / "devices.yaml", text)
    with pytest.raises(ConfigError, match=expected):
        load_devices(path)


def test_devices_alias_bomb_fails_fast(tmp_path: Path) -> None:
    text = f"- name: a\n  speed: 1\n  memory: 1GiB\n  extra: {ALIAS_BOMB}\n"
    path = _write(tmp_path / "devices.yaml", text.encode())
    started = time.monotonic()
    with pytest.raises(ConfigError, match="unknown key 'extra'") as caught:
        load_devices(path)
    assert time.monotonic() - started < 2.0
    assert len(str(caught.value)) < 2000


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"cuts": "ab"}', "'cuts'"),
        ('{"num_microbatches": "4"}', "'num_microbatches'"),
        ('{"num_microbatches": true}', "'num_microbatches'"),
        ('{"round": "x"}', "'round'"),
        ('{"devices": 5}', "'devices'"),
        ('{"example_dtype": []}', "'example_dtype'"),
    ],
)
def test_job_json_bad_value_rejected(text: str, expected: str) -> None:
    base = {"model": "homesplit.models:mlp", "example_shape": [1, 4], "cuts": [], "data": "m:f"}
    raw = json.loads(text) if text.startswith("{\"") else None
    document = json.dumps({**base, **raw}) if raw is not None else text
    with pytest.raises(ConfigError, match=expected):
        PipelineJob.from_json(document)


def test_tensor_file_bad_name_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.hstf"
    save_tensors(path, {"w": torch.arange(4.0)})
    data = path.read_bytes()
    # The name length stays 1, but the name byte becomes invalid UTF-8.
    _write(path, data[:8] + b"\xff" + data[9:])
    with pytest.raises(FrameError, match="not UTF-8"):
        load_tensors(path)


def test_tensor_file_duplicate_name_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.hstf"
    save_tensors(path, {"w": torch.arange(4.0)})
    data = path.read_bytes()
    _write(path, data + data[4:])
    with pytest.raises(FrameError, match="twice"):
        load_tensors(path)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("household.json", b"{", "corrupt"),
        ("household.json", b"\xff", "corrupt"),
        ("household.json", b"[1]", "household id"),
        ("ca.pem", b"junk\n", "not a PEM certificate"),
        ("issued/junk.pem", b"junk\n", "not a PEM certificate"),
    ],
)
def test_household_corrupt_file_rejected(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    Household.create(tmp_path, "smith")
    _write(tmp_path / name, content)
    with pytest.raises(ConfigError, match=expected):
        Household(tmp_path).devices()


def test_enroll_huge_days_rejected(tmp_path: Path) -> None:
    household = Household.create(tmp_path, "smith")
    with pytest.raises(ConfigError, match="outlive the household CA"):
        household.enroll("phone", days=10**9)


VALID_EXPERIMENT = f"""
app: {APP}
rounds: 2
model: household_digits.task:build_model
example-shape: [1, 1, 8, 8]
households:
  - id: household-a
    devices: [{{name: laptop, holds-data: true}}, {{name: phone}}]
"""


def _experiment(tmp_path: Path, data: bytes):
    return load_experiment(_write(tmp_path / "experiment.yaml", data))



def test_experiment_not_utf8_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="UTF-8"):
        _experiment(tmp_path, VALID_EXPERIMENT.encode() + b"# \xff\n")



@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_experiment_infinite_timeout_rejected(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="timeouts.connect"):
        _experiment(tmp_path, (VALID_EXPERIMENT + f"timeouts: {{connect: {value}}}\n").encode())



@pytest.mark.parametrize("old, new", [("{name: phone}", "{name: null}"), ("{name: phone}", "{name: 7}"), ("id: household-a", "id: 12")])
def test_experiment_non_string_name_rejected(tmp_path: Path, old: str, new: str) -> None:
    with pytest.raises(ConfigError):
        _experiment(tmp_path, VALID_EXPERIMENT.replace(old, new).encode())



def test_experiment_alias_bomb_short_message(tmp_path: Path) -> None:
    # Five levels keep the test fast; each further level costs nine times more.
    bomb = ALIAS_BOMB.split(", &l5")[0] + "]"
    with pytest.raises(ConfigError, match="seed") as caught:
        _experiment(tmp_path, (VALID_EXPERIMENT + f"seed: {bomb}\n").encode())
    assert len(str(caught.value)) < 2000
