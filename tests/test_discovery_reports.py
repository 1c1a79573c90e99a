"""Discovery replies with and without the self-benchmark and power figures."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from homesplit.clients.app import _self_benchmark
from homesplit.clients.node import read_device_config
from homesplit.errors import ConfigError
from homesplit.strategies.discovery import _device_info

NODE_CONFIG = {"household": "h", "device": "phone", "listen": "127.0.0.1:9101", "insecure-links": True}
OLD_REPLY = {
    "household": "h",
    "device": "phone",
    "address": "127.0.0.1:9101",
    "holds-data": True,
    "num-examples": 10,
    "memory-bytes": 1 << 30,
    "cpu-count": 2,
}


def test_discovery_reply_without_new_keys():
    info = _device_info(7, ConfigRecord(OLD_REPLY))

    assert info.flops_per_second is None
    assert info.idle_watts is None
    assert info.busy_watts is None
    assert info.memory_bytes == 1 << 30


def test_discovery_reply_with_speed_and_power():
    reply = {**OLD_REPLY, "flops-per-second": 2.5e9, "idle-watts": 1.5, "busy-watts": 4.0}
    info = _device_info(7, ConfigRecord(reply))

    assert info.flops_per_second == 2.5e9
    assert info.idle_watts == 1.5
    assert info.busy_watts == 4.0


def test_self_benchmark_measures_positive_flops():
    assert _self_benchmark(1) > 0


def test_node_config_reads_power_figures():
    device = read_device_config({**NODE_CONFIG, "idle-watts": "2", "busy-watts": 6.5}, {}, run_id=1)

    assert device.idle_watts == 2.0
    assert device.busy_watts == 6.5


def test_node_config_without_power_figures():
    device = read_device_config(NODE_CONFIG, {}, run_id=1)

    assert device.idle_watts is None
    assert device.busy_watts is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"idle-watts": 2.0}, "only one of idle-watts and busy-watts"),
        ({"idle-watts": "many", "busy-watts": 3.0}, "idle-watts='many' is not a number"),
        ({"idle-watts": -1.0, "busy-watts": 3.0}, "idle-watts=-1.0 is invalid"),
        ({"idle-watts": 5.0, "busy-watts": 3.0}, "busy-watts=3.0 is below idle-watts=5.0"),
    ],
)
def test_node_config_rejects_invalid_power(extra, message):
    with pytest.raises(ConfigError, match=message):
        read_device_config({**NODE_CONFIG, **extra}, {}, run_id=1)
