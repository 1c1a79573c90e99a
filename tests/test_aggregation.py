"""Unit tests of household aggregation: all stages or nothing, averages by parameter name."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from homesplit.household_plan import HouseholdPlan, StageAssignment
from homesplit.records import ARRAYS, METRICS
from homesplit.strategies import HouseholdOutcome, average_by_name, collect_outcomes


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Give Flower's Message constructor the run and node ids a ServerApp process would have."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _current() -> ArrayRecord:
    return ArrayRecord(
        {
            "a.weight": Array(np.zeros((2, 2), dtype=np.float32)),
            "b.weight": Array(np.full(3, 7.0, dtype=np.float32)),
            "c.bias": Array(np.ones(1, dtype=np.float32)),
        }
    )


def test_average_weights_by_examples():
    first = HouseholdOutcome("h1", num_examples=100, arrays={"a.weight": np.ones((2, 2), np.float32)})
    second = HouseholdOutcome("h2", num_examples=300, arrays={"a.weight": np.full((2, 2), 5.0, np.float32)})
    result = average_by_name(_current(), [first, second])
    np.testing.assert_allclose(result["a.weight"].numpy(), np.full((2, 2), 4.0))


def test_average_is_per_parameter_name():
    # h1 returns a.weight and b.weight, h2 only b.weight, as with different cuts.
    first = HouseholdOutcome("h1", num_examples=1, arrays={"a.weight": np.ones((2, 2), np.float32), "b.weight": np.zeros(3, np.float32)})
    second = HouseholdOutcome("h2", num_examples=1, arrays={"b.weight": np.full(3, 2.0, np.float32)})
    result = average_by_name(_current(), [first, second])
    np.testing.assert_array_equal(result["a.weight"].numpy(), np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(result["b.weight"].numpy(), np.ones(3, np.float32))


def test_parameter_nobody_returned_keeps_value():
    only = HouseholdOutcome("h1", num_examples=10, arrays={"a.weight": np.ones((2, 2), np.float32)})
    result = average_by_name(_current(), [only])
    np.testing.assert_array_equal(result["c.bias"].numpy(), np.ones(1, np.float32))
    np.testing.assert_array_equal(result["b.weight"].numpy(), np.full(3, 7.0, np.float32))


def test_single_household_returns_bit_exact():
    value = np.random.default_rng(0).standard_normal((2, 2)).astype(np.float32)
    result = average_by_name(_current(), [HouseholdOutcome("h1", num_examples=37, arrays={"a.weight": value})])
    assert result["a.weight"].numpy().tobytes() == value.tobytes()
    assert result["a.weight"].numpy().dtype == np.float32


def test_zero_example_household_gets_no_weight():
    empty = HouseholdOutcome("h0", num_examples=0, arrays={"a.weight": np.full((2, 2), 100.0, np.float32)})
    real = HouseholdOutcome("h1", num_examples=5, arrays={"a.weight": np.ones((2, 2), np.float32)})
    result = average_by_name(_current(), [empty, real])
    np.testing.assert_array_equal(result["a.weight"].numpy(), np.ones((2, 2), np.float32))


def _plan(household: str, devices: list[str]) -> HouseholdPlan:
    stages = [StageAssignment(stage=k, device=d, node_id=k + 1, address="127.0.0.1:1") for k, d in enumerate(devices)]
    return HouseholdPlan(household=household, cuts=["x"] * (len(devices) - 1), stages=stages, num_microbatches=2, schedule="gpipe", num_examples=10)


def _reply(to: Message, arrays: dict[str, np.ndarray] | None, examples: int) -> Message:
    content = RecordDict({METRICS: MetricRecord({"num-examples": examples})})
    if arrays is not None:
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content, reply_to=to)


def _sent(node_id: int) -> Message:
    message = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type="train")
    # Flower sets the id when it pushes a message; tests set one by hand.
    message.metadata.__dict__["_message_id"] = f"m{node_id}"
    return message


def test_household_with_failed_stage_is_dropped(caplog):
    plans = {"h1": _plan("h1", ["laptop", "phone"]), "h2": _plan("h2", ["laptop", "phone"])}
    messages = {(h, d): _sent(i) for i, (h, d) in enumerate([("h1", "laptop"), ("h1", "phone"), ("h2", "laptop"), ("h2", "phone")])}
    sent = {m.metadata.message_id: key for key, m in messages.items()}
    replies = [
        _reply(messages["h1", "laptop"], {"a.weight": np.ones((2, 2), np.float32)}, 10),
        _reply(messages["h1", "phone"], {"b.weight": np.ones(3, np.float32)}, 10),
        _reply(messages["h2", "laptop"], {"a.weight": np.ones((2, 2), np.float32)}, 10),
        Message(Error(code=2, reason="h2/phone (stage 1) failed: PeerClosedError"), reply_to=messages["h2", "phone"]),
    ]
    outcomes = collect_outcomes(plans, sent, replies, weighted_by_key="num-examples", server_round=1)
    assert outcomes["h1"].succeeded
    assert not outcomes["h2"].succeeded
    assert "phone" in outcomes["h2"].failures
    assert "device phone failed" in caplog.text
    assert "PeerClosedError" in caplog.text


def test_missing_reply_drops_household():
    plans = {"h1": _plan("h1", ["laptop", "phone"])}
    laptop, phone = _sent(1), _sent(2)
    sent = {laptop.metadata.message_id: ("h1", "laptop"), phone.metadata.message_id: ("h1", "phone")}
    outcomes = collect_outcomes(plans, sent, [_reply(laptop, {}, 5)], weighted_by_key="num-examples", server_round=3)
    assert outcomes["h1"].failures == {"phone": "no reply before the round's timeout"}


@pytest.mark.parametrize("arrays", [None])
def test_reply_without_arrays_counts_as_failure(arrays):
    plans = {"h1": _plan("h1", ["laptop", "phone"])}
    laptop, phone = _sent(1), _sent(2)
    sent = {laptop.metadata.message_id: ("h1", "laptop"), phone.metadata.message_id: ("h1", "phone")}
    replies = [_reply(laptop, {}, 5), _reply(phone, arrays, 5)]
    outcomes = collect_outcomes(plans, sent, replies, weighted_by_key="num-examples", server_round=1)
    assert "no ArrayRecord" in outcomes["h1"].failures["phone"]
