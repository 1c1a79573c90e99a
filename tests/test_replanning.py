"""Re-planning in HomesplitStrategy: plans kept while devices stay, failed devices left out next round.

The strategy's own planning and aggregation methods run on hand-made
discovery results and replies, without Flower processes.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from homesplit.errors import ConfigError
from homesplit.household_plan import DeviceInfo, plan_household
from homesplit.models import mlp
from homesplit.records import ARRAYS, METRICS
from homesplit.strategies import HomesplitStrategy
from homesplit.strategies.replanning import failed_devices

build_model = functools.partial(mlp, in_features=8, hidden=16, depth=4, classes=2)


def example_inputs() -> tuple:
    return (torch.zeros(1, 8),)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Give Flower's Message constructor the run and node ids a ServerApp process would have."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _device(household: str, name: str, node_id: int, *, owner: bool = False, memory: int = 1 << 30) -> DeviceInfo:
    return DeviceInfo(
        household=household,
        device=name,
        address=f"127.0.0.1:{9100 + node_id}",
        node_id=node_id,
        holds_data=owner,
        num_examples=10 if owner else 0,
        memory_bytes=memory,
    )


HOUSEHOLD_H = [
    _device("h", "phone", 1, owner=True),
    _device("h", "laptop", 2, memory=3 << 30),
    _device("h", "tv", 3, memory=2 << 30),
]
HOUSEHOLD_G = [_device("g", "tablet", 4, owner=True), _device("g", "desktop", 5)]


class _CountingPlanFn:
    """`plan_household`, counting the households it plans."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, devices, **options):
        self.calls.append((devices[0].household, [d.device for d in devices]))
        return plan_household(devices, **options)


def _strategy(devices, **options) -> HomesplitStrategy:
    strategy = HomesplitStrategy(model_fn=build_model, example_inputs=example_inputs, min_household_devices=2, **options)
    strategy.devices = list(devices)
    return strategy


def _train_round(strategy: HomesplitStrategy, server_round: int, failures: dict[tuple[str, str], str | None]) -> dict:
    """Plan, send and aggregate one training round; `failures` maps (household, device) to an error reason, or None for no reply."""
    arrays = ArrayRecord(build_model().state_dict())
    plans = strategy._plan_all()
    messages = strategy._messages(plans, arrays, ConfigRecord({}), "train", server_round)
    for number, message in enumerate(messages):
        # Flower sets the id when it pushes a message; tests set one by hand.
        message.metadata.__dict__["_message_id"] = f"r{server_round}m{number}"

    replies = []
    for household, device, message in strategy._outgoing:
        if (household, device) not in failures:
            content = RecordDict(
                {
                    METRICS: MetricRecord({"num-examples": 10}),
                    ARRAYS: message.content.array_records[ARRAYS],
                }
            )
            replies.append(Message(content, reply_to=message))
        elif failures[household, device] is not None:
            replies.append(Message(Error(code=2, reason=failures[household, device]), reply_to=message))
    strategy.aggregate_train(server_round, replies)
    return plans


def test_replanning_excludes_failed_device(caplog):
    strategy = _strategy([*HOUSEHOLD_H, *HOUSEHOLD_G])
    first = _train_round(
        strategy,
        1,
        {
            ("h", "tv"): None,
            ("h", "laptop"): "h/laptop (stage 1) failed: PeerClosedError: tv closed the connection",
        },
    )
    assert first["h"].devices == ["phone", "laptop", "tv"]

    with caplog.at_level(logging.WARNING, logger="homesplit.strategies.replanning"):
        second = strategy._plan_all()

    assert second["h"].devices == ["phone", "laptop"]
    assert second["h"].idle_devices == ["tv"]
    assert "devices ['tv'] failed in the previous round and are left out" in caplog.text
    assert second["g"] is first["g"]


def test_replanning_readmits_device_after_success():
    strategy = _strategy(HOUSEHOLD_H)
    _train_round(strategy, 1, {("h", "tv"): "h/tv (stage 2) failed: RuntimeError: out of memory"})
    second = _train_round(strategy, 2, {})
    third = strategy._plan_all()

    assert second["h"].devices == ["phone", "laptop"]
    assert third["h"].devices == ["phone", "laptop", "tv"]


def test_replanning_keeps_failed_data_owner(caplog):
    strategy = _strategy(HOUSEHOLD_H)
    _train_round(strategy, 1, {("h", "phone"): "h/phone (stage 0) failed: RuntimeError: disk full"})

    with caplog.at_level(logging.WARNING, logger="homesplit.strategies.replanning"):
        second = strategy._plan_all()

    assert second["h"].devices == ["phone", "laptop", "tv"]
    assert "device phone failed in the previous round but is the data owner" in caplog.text


def test_replanning_keeps_device_when_too_few_remain(caplog):
    strategy = _strategy(HOUSEHOLD_G)
    _train_round(strategy, 1, {("g", "desktop"): None})

    with caplog.at_level(logging.WARNING, logger="homesplit.strategies.replanning"):
        second = strategy._plan_all()

    assert second["g"].devices == ["tablet", "desktop"]
    assert "cannot be planned without them" in caplog.text
    assert "fewer than min_household_devices=2" in caplog.text


def test_replanning_only_when_devices_change():
    plan_fn = _CountingPlanFn()
    strategy = _strategy([*HOUSEHOLD_H, *HOUSEHOLD_G], plan_fn=plan_fn)
    first = strategy._plan_all()
    again = strategy._plan_all()
    assert again["h"] is first["h"]
    assert len(plan_fn.calls) == 2

    strategy.devices = [*HOUSEHOLD_H, *HOUSEHOLD_G, _device("g", "console", 6)]
    changed = strategy._plan_all()

    assert plan_fn.calls[2:] == [("g", ["console", "desktop", "tablet"])]
    assert changed["h"] is first["h"]
    assert "console" in changed["g"].devices


def test_replanning_after_node_restart():
    plan_fn = _CountingPlanFn()
    strategy = _strategy(HOUSEHOLD_G, plan_fn=plan_fn)
    strategy._plan_all()
    strategy.devices = [HOUSEHOLD_G[0], _device("g", "desktop", 7)]
    replanned = strategy._plan_all()

    assert len(plan_fn.calls) == 2
    assert replanned["g"].stages[1].node_id == 7


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        ({"tv": "no reply before the round's timeout", "laptop": "h/laptop (stage 1) failed: PeerClosedError: x"}, {"tv"}),
        ({"tv": "h/tv (stage 2) failed: RuntimeError: boom", "laptop": "h/laptop (stage 1) failed: PeerTimeoutError: x"}, {"tv"}),
        ({"tv": "h/tv (stage 2) failed: LinkError: y", "laptop": "h/laptop (stage 1) failed: PeerAbortedError: x"}, {"tv", "laptop"}),
        ({"tv": "reply has no ArrayRecord 'arrays'"}, {"tv"}),
    ],
)
def test_failed_devices_ignores_neighbour_link_errors(failures, expected):
    assert failed_devices(failures) == expected


def test_strategy_rejects_unknown_planner():
    with pytest.raises(ConfigError, match="planner='fastest' is unknown"):
        HomesplitStrategy(model_fn=build_model, example_inputs=example_inputs, planner="fastest")


def test_strategy_rejects_planner_and_plan_fn():
    with pytest.raises(ConfigError, match="pass only one of them"):
        HomesplitStrategy(model_fn=build_model, example_inputs=example_inputs, planner="time", plan_fn=plan_household)
