"""Tests of devices.yaml loading and validation."""

from __future__ import annotations

import textwrap

import pytest

from homesplit.errors import ConfigError
from homesplit.planner.devices import load_devices, parse_bandwidth, parse_bytes, parse_devices, parse_seconds
from homesplit.planner.profiles import DEFAULT_LINK, LinkProfile

GOOD_LIST = """
- name: laptop
  speed: 1.0
  memory: 2GiB
  idle_watts: 6
  busy_watts: 35
  links:
    pi: {bandwidth: 100Mbit/s, latency: 3ms}
- name: pi
  speed: 0.15
  memory: 512MiB
  idle_watts: 2.5
  busy_watts: 6.0
- name: phone
  speed: 0.4
  memory: 1500000000
"""


def write(tmp_path, text):
    path = tmp_path / "devices.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_list_form_loads_devices(tmp_path):
    household = load_devices(write(tmp_path, GOOD_LIST))

    assert [device.name for device in household.devices] == ["laptop", "pi", "phone"]
    assert household.devices[0].memory_bytes == 2 * 2**30
    assert household.devices[1].memory_bytes == 512 * 2**20
    assert household.devices[2].memory_bytes == 1_500_000_000
    assert household.devices[1].speed == 0.15
    assert household.devices[0].busy_watts == 35.0
    assert household.devices[2].idle_watts is None


def test_links_apply_both_directions(tmp_path):
    household = load_devices(write(tmp_path, GOOD_LIST))
    expected = LinkProfile(bandwidth_bytes_per_second=12.5e6, latency_seconds=3e-3)

    assert household.links.between("laptop", "pi") == expected
    assert household.links.between("pi", "laptop") == expected
    assert household.links.between("pi", "phone") == DEFAULT_LINK


def test_mapping_form_takes_names_from_keys():
    household = parse_devices({"laptop": {"speed": 1, "memory": "8GiB"}, "pi": {"speed": 0.2, "memory": 10**9}})

    assert [device.name for device in household.devices] == ["laptop", "pi"]
    assert household.devices[1].memory_bytes == 10**9


# Marks a key that `device` leaves out.
DROP = object()


def device(**overrides):
    entry = {"name": "pi", "speed": 0.2, "memory": "512MiB"}
    entry.update(overrides)
    return {key: value for key, value in entry.items() if value is not DROP}


@pytest.mark.parametrize(
    "data, fragments",
    [
        ([device(memory=-1)], ["'memory'", "-1", "negative"]),
        ([device(memory="-2GiB")], ["'memory'", "'-2GiB'", "negative"]),
        ([device(memory="lots")], ["'memory'", "'lots'"]),
        ([device(memory="2 parsecs")], ["'memory'", "'2 parsecs'"]),
        ([device(colour="blue")], ["unknown key 'colour'", "'blue'"]),
        ([device(), device()], ["'pi'", "appears twice"]),
        ([device(speed="fast")], ["'speed'", "'fast'", "must be a number"]),
        ([device(speed=True)], ["'speed'", "True", "must be a number"]),
        ([device(speed=0)], ["'speed'", "0", "positive"]),
        ([device(name=DROP)], ["no 'name' key"]),
        ([device(name="")], ["'name'", "''"]),
        ([device(speed=DROP)], ["'speed'", "missing"]),
        ([device(memory=DROP)], ["'memory'", "missing"]),
        ([device(idle_watts=-3, busy_watts=5)], ["'idle_watts'", "-3", "negative"]),
        ([device(idle_watts=3)], ["both idle_watts and busy_watts"]),
        ([device(idle_watts=9, busy_watts=5)], ["busy_watts=5", "idle_watts=9"]),
        ([device(links={"tv": {"bandwidth": 1e6, "latency": 0}})], ["'tv'", "not a device"]),
        ([device(links={"pi": {"bandwidth": 1e6, "latency": 0}})], ["links names the device itself"]),
        (
            [device(links={"phone": {"bandwidth": "fast", "latency": 0}}), device(name="phone")],
            ["'bandwidth'", "'fast'"],
        ),
        (
            [device(links={"phone": {"bandwidth": 1e6, "jitter": 1}}), device(name="phone")],
            ["unknown key 'jitter'", "1"],
        ),
        ([device(links={"phone": {"bandwidth": 1e6}}), device(name="phone")], ["'latency'", "missing"]),
        ({"pi": {"name": "tv", "speed": 1, "memory": 1}}, ["'name'", "'tv'"]),
        ([], ["no devices"]),
        ("pi", ["list or mapping"]),
        (["pi"], ["mapping of keys", "'pi'"]),
    ],
)
def test_invalid_devices_raise_config_error(data, fragments):
    with pytest.raises(ConfigError) as raised:
        parse_devices(data)

    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message


def test_file_errors_name_the_path(tmp_path):
    path = write(tmp_path, "- name: pi\n  speed: 1\n  memory: -5\n")
    with pytest.raises(ConfigError) as raised:
        load_devices(path)

    assert str(path) in str(raised.value)


def test_missing_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_devices(tmp_path / "absent.yaml")


def test_invalid_yaml_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_devices(write(tmp_path, "- name: [pi\n"))


@pytest.mark.parametrize(
    "text, expected",
    [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000), (1024, 1024), ("10", 10), ("3KB", 3000)],
)
def test_parse_bytes_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("100Mbit/s", 12.5e6), ("5MB/s", 5e6), ("1MiB/s", 2**20), (2e6, 2e6), ("8bit/s", 1.0)],
)
def test_parse_bandwidth_units(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [("3ms", 3e-3), ("250us", 250e-6), ("0.5s", 0.5), (0.01, 0.01), ("2", 2.0)])
def test_parse_seconds_units(text, expected):
    assert parse_seconds(text) == pytest.approx(expected)
