"""Planning from discovery replies, and link measurement over a real loopback link."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from homesplit.errors import ConfigError, LinkError
from homesplit.planner import LayerProfile, LinkTable, ModelProfile, plan_household
from homesplit.planner.discovery import data_owner_from_discovery, devices_from_discovery, plan_from_discovery
from homesplit.planner.linkprobe import echo_link_probes, measure_link, measure_link_pair
from homesplit.transport import PeerIdentity, TcpTransport, open_listener
from homesplit.wire import Frame, FrameKind

MIB = 1 << 20


def _layer(index: int, *, seconds: float = 1e-3, parameters: int = 1000) -> LayerProfile:
    return LayerProfile(
        name=f"unit{index}",
        cut=f"cut{index}",
        seconds_per_sample=seconds,
        output_bytes_per_sample=256,
        parameter_count=parameters,
        parameter_bytes=4 * parameters,
        gradient_bytes=4 * parameters,
        optimizer_bytes={"sgd": 0, "adam": 8 * parameters},
        activation_bytes_per_sample=512,
    )


def _profile(num_units: int = 6) -> ModelProfile:
    layers = [_layer(i) for i in range(num_units)]
    last = layers[-1]
    layers[-1] = LayerProfile(**{**last.to_dict(), "cut": None})
    return ModelProfile(layers=layers, reference_flops_per_second=1e10, batch_shape=[[8, 4]], signature="test")


def _reports() -> list[dict]:
    return [
        {"device": "laptop", "speed": 1.0, "memory_bytes": 4 * MIB},
        {"device": "phone", "speed": 0.25, "memory_bytes": 4 * MIB, "holds_data": True, "num_examples": 100},
        {"device": "tv", "flops_per_second": 5e9, "memory_bytes": 4 * MIB},
    ]


def test_discovery_pins_data_owner_to_stage_zero():
    plan = plan_from_discovery(_profile(), _reports(), batch_size=16)

    assert plan.stages[0].device == "phone"


def test_discovery_plan_equals_direct_plan():
    devices = devices_from_discovery(_reports(), reference_flops_per_second=1e10)
    direct = plan_household(_profile().layers, devices, LinkTable(), batch_size=16, data_owner="phone")

    plan = plan_from_discovery(_profile(), _reports(), batch_size=16)

    assert plan.to_dict() == direct.to_dict()


def test_discovery_speed_from_flops():
    devices = devices_from_discovery(_reports(), reference_flops_per_second=1e10)

    assert [device.speed for device in devices] == [1.0, 0.25, 0.5]


def test_discovery_subtracts_runtime_bytes():
    reports = _reports()
    reports[0]["runtime_bytes"] = MIB

    devices = devices_from_discovery(reports, reference_flops_per_second=1e10, runtime_bytes=2 * MIB)

    assert [device.memory_bytes for device in devices] == [3 * MIB, 2 * MIB, 2 * MIB]


def test_discovery_keeps_power_figures():
    reports = [{**report, "idle_watts": 2.0, "busy_watts": 10.0} for report in _reports()]

    plan = plan_from_discovery(_profile(), reports, batch_size=16, objective="energy")

    assert plan.energy_joules_per_sample is not None
    assert plan.stages[0].device == "phone"


def test_discovery_owner_with_most_examples(caplog):
    reports = _reports()
    reports[0].update(holds_data=True, num_examples=500)

    with caplog.at_level("WARNING"):
        owner = data_owner_from_discovery(reports)

    assert owner == "laptop"
    assert "'phone'" in caplog.text


def test_discovery_without_data_owner_rejected():
    reports = [{**report, "holds_data": False} for report in _reports()]

    with pytest.raises(ConfigError, match="no device holds data"):
        plan_from_discovery(_profile(), reports, batch_size=16)


def test_discovery_explicit_owner_wins():
    plan = plan_from_discovery(_profile(), _reports(), batch_size=16, data_owner="tv")

    assert plan.stages[0].device == "tv"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"memory_bytes": -1}, "'memory_bytes' has value -1"),
        ({"memory_bytes": 1.5}, "'memory_bytes' has value 1.5"),
        ({"speed": 0}, "'speed' has value 0"),
        ({"speed": float("nan")}, "'speed' has value nan"),
        ({"speed": None, "flops_per_second": None}, "lacks both 'speed' and 'flops_per_second'"),
        ({"idle_watts": 3.0}, "only one of idle_watts and busy_watts"),
        ({"idle_watts": 3.0, "busy_watts": 1.0}, "busy_watts=1.0 is below idle_watts=3.0"),
        ({"idle_watts": -1.0, "busy_watts": 1.0}, "'idle_watts' has value -1.0"),
        ({"holds_data": "yes"}, "'holds_data' has value 'yes'"),
        ({"device": ""}, "'device' with value ''"),
        ({"runtime_bytes": -5}, "'runtime_bytes' has value -5"),
    ],
)
def test_discovery_rejects_invalid_reply(change, message):
    reports = _reports()
    reports[0].update(change)

    with pytest.raises(ConfigError, match=message):
        plan_from_discovery(_profile(), reports, batch_size=16)


def test_discovery_rejects_missing_memory():
    reports = _reports()
    del reports[1]["memory_bytes"]

    with pytest.raises(ConfigError, match="device 'phone': discovery reply lacks key 'memory_bytes'"):
        plan_from_discovery(_profile(), reports, batch_size=16)


def test_discovery_rejects_duplicate_device():
    reports = [*_reports(), {"device": "tv", "speed": 1.0, "memory_bytes": MIB}]

    with pytest.raises(ConfigError, match="'tv' replied twice"):
        plan_from_discovery(_profile(), reports, batch_size=16)


def test_discovery_flops_without_reference_rejected():
    with pytest.raises(ConfigError, match="reference_flops_per_second=None"):
        devices_from_discovery(_reports())


@pytest.fixture
def loopback_links():
    """Yield a connected (dialed, accepted) pair of TCP links on 127.0.0.1."""
    transport = TcpTransport()
    listener = open_listener("127.0.0.1:0")
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    up, down = PeerIdentity("laptop", 0, "test"), PeerIdentity("phone", 1, "test")
    accepted: dict = {}
    thread = threading.Thread(target=lambda: accepted.setdefault("link", transport.accept(listener, local=down, expect=up)))
    thread.start()
    dialed = transport.dial(address, local=up, expect=down)
    thread.join(30)
    listener.close()
    assert "link" in accepted, "the accepting side did not connect within 30 s"
    yield dialed, accepted["link"]
    dialed.close()
    accepted["link"].close()


def test_link_probe_measures_loopback(loopback_links):
    dialed, accepted = loopback_links

    profile = measure_link_pair(dialed, accepted, repeats=5)

    # Loopback TCP in Python moves hundreds of MB/s with sub-millisecond latency;
    # the bounds are an order of magnitude looser than that.
    assert profile.bandwidth_bytes_per_second > 20e6
    assert profile.latency_seconds < 0.01


def test_link_probe_predicts_round_trip(loopback_links):
    dialed, accepted = loopback_links
    profile = measure_link_pair(dialed, accepted, repeats=7)
    payload = torch.zeros(4 * MIB, dtype=torch.uint8)
    thread = threading.Thread(target=echo_link_probes, args=(accepted,), daemon=True)
    thread.start()

    trips = []
    for sequence in range(5):
        start = time.perf_counter()
        dialed.send(Frame(FrameKind.ACTIVATION, payload, step=sequence))
        dialed.recv(timeout=30)
        trips.append(time.perf_counter() - start)
    dialed.send(Frame(FrameKind.METRIC, torch.zeros(1, dtype=torch.float64)))
    thread.join(30)

    predicted = 2 * profile.transfer_seconds(4 * MIB)
    measured = sorted(trips)[2]
    assert 0.33 * measured < predicted < 3 * measured


def test_link_probe_rejects_foreign_frame(loopback_links):
    dialed, accepted = loopback_links
    dialed.send(Frame(FrameKind.LABEL, torch.zeros(2)))

    with pytest.raises(LinkError, match="got a LABEL frame"):
        echo_link_probes(accepted, timeout=10)


def test_link_probe_rejects_invalid_sizes(loopback_links):
    dialed, _ = loopback_links

    with pytest.raises(ConfigError, match="small_bytes=100, large_bytes=100"):
        measure_link(dialed, small_bytes=100, large_bytes=100)
