"""The profile-driven plan function on discovery reports: speeds, fallback, data owner, stage limit."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

import homesplit.planner.overhead as overhead_module
from homesplit.household_plan import DeviceInfo, plan_household
from homesplit.models import mlp
from homesplit.partition import candidate_cuts
from homesplit.profiled_plan import household_profile, plan_household_profiled

GIB = 1 << 30
# Smaller micro-batches pay every operator's fixed cost more often. At 16 samples or
# more the time per sample stays near the full batch's, so splitting this MLP pays.
BATCH = 256
# Speeds are relative to the machine running the tests. Devices 100 times slower make
# compute, not the default link's 2 ms latency, the bottleneck for this small MLP.
SLOW = 0.01
build_model = functools.partial(mlp, in_features=32, hidden=256, depth=6, classes=10)


def _meta_model() -> tuple[torch.nn.Module, tuple]:
    with torch.device("meta"):
        return build_model(), (torch.empty(1, 32),)


@pytest.fixture(scope="module")
def reference_flops() -> float:
    """The server's own matrix-multiply FLOP/s, stored with the profile; a device of speed s reports s times it.

    The profile kept for this batch size has no stage runtime cost, so that
    the tests using it compare device speeds alone: at speed 0.01 the
    runtime's cost per micro-batch would outweigh this MLP's compute.
    """
    model, inputs = _meta_model()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(overhead_module, "measure_stage_overhead", lambda **options: 0.0)
        return household_profile(model, inputs, batch_size=BATCH, model_fn=build_model).reference_flops_per_second


def _device(name: str, node_id: int, *, speed: float | None, reference: float, owner: bool = False, watts=None) -> DeviceInfo:
    idle, busy = watts if watts is not None else (None, None)
    return DeviceInfo(
        household="h",
        device=name,
        address=f"127.0.0.1:{9100 + node_id}",
        node_id=node_id,
        holds_data=owner,
        num_examples=100 if owner else 0,
        memory_bytes=4 * GIB,
        flops_per_second=None if speed is None else speed * reference,
        idle_watts=idle,
        busy_watts=busy,
    )


def _plan(devices, **options):
    model, inputs = _meta_model()
    return plan_household_profiled(devices, model=model, example_inputs=inputs, batch_size=BATCH, model_fn=build_model, **options)


def _units_per_stage(plan) -> list[int]:
    model, inputs = _meta_model()
    cuts = candidate_cuts(model, example_inputs=inputs)
    bounds = [0, *(cuts.index(cut) + 1 for cut in plan.cuts), len(cuts) + 1]
    return [stop - start for start, stop in zip(bounds, bounds[1:])]


def test_profiled_plan_slow_device_gets_less(reference_flops):
    devices = [
        _device("phone", 1, speed=SLOW, reference=reference_flops, owner=True),
        _device("laptop", 2, speed=SLOW, reference=reference_flops),
        _device("kettle", 3, speed=SLOW / 100, reference=reference_flops),
    ]
    plan = _plan(devices)

    assert plan.devices[:2] == ["phone", "laptop"]
    units = dict(zip(plan.devices, _units_per_stage(plan)))
    assert "kettle" in plan.idle_devices or units["kettle"] < min(units["phone"], units["laptop"])
    assert sorted([*plan.devices, *plan.idle_devices]) == ["kettle", "laptop", "phone"]


def test_profiled_plan_fast_device_gets_more(reference_flops):
    devices = [
        _device("phone", 1, speed=SLOW / 4, reference=reference_flops, owner=True),
        _device("laptop", 2, speed=SLOW * 4, reference=reference_flops),
    ]
    plan = _plan(devices)

    assert plan.devices == ["phone", "laptop"]
    phone_units, laptop_units = _units_per_stage(plan)
    assert laptop_units > phone_units


@pytest.mark.parametrize(
    ("owner", "speeds"),
    [
        ("phone", {"phone": SLOW / 10, "laptop": SLOW * 4, "tv": SLOW}),
        ("laptop", {"phone": SLOW / 10, "laptop": SLOW * 4, "tv": SLOW}),
        ("tv", {"phone": SLOW, "laptop": SLOW, "tv": SLOW}),
    ],
)
def test_profiled_plan_owner_runs_stage_zero(reference_flops, owner, speeds):
    devices = [
        _device(name, k + 1, speed=speed, reference=reference_flops, owner=name == owner)
        for k, (name, speed) in enumerate(speeds.items())
    ]
    plan = _plan(devices)

    assert plan.devices[0] == owner
    assert plan.stages[0].node_id == devices[[d.device for d in devices].index(owner)].node_id
    assert plan.num_examples == 100


def test_profiled_plan_without_speed_falls_back(reference_flops, caplog):
    devices = [
        _device("phone", 1, speed=1.0, reference=reference_flops, owner=True),
        _device("laptop", 2, speed=None, reference=reference_flops),
    ]
    model, inputs = _meta_model()
    with caplog.at_level(logging.INFO, logger="homesplit.profiled_plan"):
        plan = _plan(devices, num_microbatches=3)
    balanced = plan_household(devices, model=model, example_inputs=inputs, num_microbatches=3)

    assert plan == balanced
    assert "['laptop'] sent no speed or memory figure" in caplog.text
    assert "parameter-balanced" in caplog.text


def test_profiled_plan_honours_max_stages(reference_flops):
    devices = [
        _device("phone", 1, speed=SLOW, reference=reference_flops, owner=True),
        _device("laptop", 2, speed=SLOW, reference=reference_flops),
        _device("tv", 3, speed=SLOW, reference=reference_flops),
    ]
    one = _plan(devices, max_stages=1)
    two = _plan(devices, max_stages=2)

    assert one.devices == ["phone"]
    assert one.cuts == []
    assert sorted(one.idle_devices) == ["laptop", "tv"]
    assert two.num_stages == 2
    assert two.devices[0] == "phone"
    assert sorted([*two.devices, *two.idle_devices]) == ["laptop", "phone", "tv"]


def test_profiled_plan_energy_without_watts_plans_time(reference_flops, caplog):
    devices = [
        _device("phone", 1, speed=1.0, reference=reference_flops, owner=True, watts=(1.0, 3.0)),
        _device("laptop", 2, speed=1.0, reference=reference_flops),
    ]
    with caplog.at_level(logging.WARNING, logger="homesplit.profiled_plan"):
        plan = _plan(devices, objective="energy")

    assert plan.devices[0] == "phone"
    assert "['laptop'] have no idle-watts and busy-watts" in caplog.text


def test_profiled_plan_energy_leaves_hungry_device_idle(reference_flops):
    # The laptop is as fast as the phone but draws 100 times the power, so
    # running any unit on it costs more energy than running it on the phone.
    devices = [
        _device("phone", 1, speed=SLOW, reference=reference_flops, owner=True, watts=(0.5, 2.0)),
        _device("laptop", 2, speed=SLOW, reference=reference_flops, watts=(50.0, 200.0)),
    ]
    plan = _plan(devices, objective="energy")

    assert plan.devices == ["phone"]
    assert plan.idle_devices == ["laptop"]


def test_household_profile_measured_once(reference_flops):
    calls = []

    def counting_model():
        calls.append(1)
        return build_model()

    model, inputs = _meta_model()
    first = household_profile(model, inputs, batch_size=BATCH, model_fn=counting_model)
    second = household_profile(model, inputs, batch_size=BATCH, model_fn=counting_model)

    assert second is first
    assert calls == []  # the module fixture profiled this model and batch already


def test_household_profile_measures_stage_overhead():
    model, inputs = _meta_model()
    # A batch size no other test uses gives a new signature, measured with real stage processes.
    profile = household_profile(model, inputs, batch_size=BATCH + 5, model_fn=build_model)

    assert profile.stage_overhead_seconds is not None
    assert profile.stage_overhead_seconds >= 0.0


def test_stage_overhead_measured_once_per_signature(monkeypatch):
    calls = []

    def counting_overhead(**options):
        calls.append(options)
        return 2e-3

    monkeypatch.setattr(overhead_module, "measure_stage_overhead", counting_overhead)
    model, inputs = _meta_model()
    # A batch size no other test uses gives a new signature.
    first = household_profile(model, inputs, batch_size=BATCH + 3, model_fn=build_model)
    second = household_profile(model, inputs, batch_size=BATCH + 3, model_fn=build_model)

    assert len(calls) == 1
    assert calls[0]["threads"] == 1
    assert first.stage_overhead_seconds == 2e-3
    assert second is first


def test_household_profile_rejects_meta_without_factory():
    from homesplit.errors import PlanError

    with torch.device("meta"):
        model = mlp(in_features=8, hidden=8, depth=2, classes=2)
    with pytest.raises(PlanError, match="pass model_fn"):
        household_profile(model, (torch.empty(1, 8, device="meta"),), batch_size=4)


def test_strategy_time_planner_uses_speeds(reference_flops):
    from homesplit.strategies import HomesplitStrategy

    strategy = HomesplitStrategy(
        model_fn=build_model, example_inputs=lambda: (torch.zeros(1, 32),), planner="time", batch_size=BATCH
    )
    strategy.devices = [
        _device("phone", 1, speed=SLOW / 4, reference=reference_flops, owner=True),
        _device("laptop", 2, speed=SLOW * 4, reference=reference_flops),
    ]
    plan = strategy._plan_all()["h"]

    assert plan.devices == ["phone", "laptop"]
    phone_units, laptop_units = _units_per_stage(plan)
    assert laptop_units > phone_units
