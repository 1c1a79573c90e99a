"""Central noise in household mode: the server adds one Gaussian draw per round to the sum of clipped updates.

The strategy's own planning and aggregation methods run on hand-made
discovery results and replies, without Flower processes. The returned
arrays equal the sent ones, so every household's update is zero and the new
global model minus the old one is the server's noise alone.
"""

from __future__ import annotations

import functools
import logging
import math
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from homesplit.errors import ConfigError, PrivacyError
from homesplit.household_plan import DeviceInfo
from homesplit.models import mlp
from homesplit.privacy.config import PrivacyConfig
from homesplit.privacy.settings import check_settings
from homesplit.records import ARRAYS, METRICS
from homesplit.strategies import HouseholdOutcome
from homesplit.strategies.central_noise import central_noise_for, noised_sum, poisson_households
from homesplit.strategies.privacy import DPHomesplitStrategy

SIGMA = 1.5
BOUND = 0.2

build_model = functools.partial(mlp, in_features=64, hidden=128, depth=2, classes=10)


def example_inputs() -> tuple:
    return (torch.zeros(1, 64),)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Give Flower's Message constructor the run and node ids a ServerApp process would have."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _config(*, sigma: float = SIGMA, bound: float = BOUND, rate: float = 1.0) -> PrivacyConfig:
    return PrivacyConfig(mode="household", noise="central", noise_multiplier=sigma, max_grad_norm=bound, sample_rate=rate)


def _current(size: int = 60_000) -> ArrayRecord:
    return ArrayRecord(
        {
            "a.weight": Array(np.zeros(size, dtype=np.float32)),
            "b.weight": Array(np.full((size // 200, 200), 3.0, dtype=np.float32)),
            "steps": Array(np.array([7], dtype=np.int64)),
        }
    )


def test_noised_sum_std_per_array():
    current = _current()
    noise = central_noise_for({"h1": _config(), "h2": _config()})
    unchanged = [HouseholdOutcome(h, num_examples=10, arrays={k: v.numpy() for k, v in current.items()}) for h in ("h1", "h2")]

    result = noised_sum(current, unchanged, noise=noise, generator=np.random.default_rng(0))

    expected_std = SIGMA * BOUND / 2
    assert noise.mean_noise_std == pytest.approx(expected_std)
    for name in ("a.weight", "b.weight"):
        moved = result[name].numpy().astype(np.float64) - current[name].numpy()
        assert float(moved.std()) == pytest.approx(expected_std, rel=0.02), name
        assert abs(float(moved.mean())) < 4 * expected_std / math.sqrt(moved.size), name
    assert result["steps"].numpy().tolist() == [7]


def test_noised_sum_divides_by_expected_households():
    current = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    # Three households could train with q = 0.5 each, so the denominator is 1.5 whatever the sample.
    noise = central_noise_for({h: _config(sigma=0.0, bound=1.0, rate=0.5) for h in ("h1", "h2", "h3")})
    small = HouseholdOutcome("h1", arrays={"w": np.array([0.3, 0.4, 0.0, 0.0], np.float32)})
    large = HouseholdOutcome("h2", arrays={"w": np.array([0.0, 0.0, 3.0, 4.0], np.float32)})

    result = noised_sum(current, [small, large], noise=noise, generator=np.random.default_rng(0))

    # h1's norm 0.5 is within the bound; the server clips h2's norm 5 to 1.
    expected = np.array([0.3, 0.4, 0.6, 0.8]) / 1.5
    np.testing.assert_allclose(result["w"].numpy(), expected, rtol=0, atol=1e-6)


def test_noised_sum_logs_unclipped_update(caplog):
    current = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    noise = central_noise_for({"h1": _config(sigma=0.0, bound=1.0)})
    outcome = HouseholdOutcome("h1", arrays={"w": np.array([3.0, 4.0], np.float32)})

    with caplog.at_level(logging.WARNING, logger="homesplit.strategies.central_noise"):
        noised_sum(current, [outcome], noise=noise, generator=np.random.default_rng(0))

    assert "Household h1 sent an update of norm 5 above its bound 1" in caplog.text


def test_central_noise_uses_largest_std():
    noise = central_noise_for({"h1": _config(sigma=1.0, bound=0.5, rate=0.2), "h2": _config(sigma=2.0, bound=0.1, rate=0.3)})
    assert noise.noise_std == pytest.approx(0.5)
    assert noise.expected_households == pytest.approx(0.5)
    assert noise.mean_noise_std == pytest.approx(1.0)


def test_central_noise_rejects_local_household():
    local = PrivacyConfig(mode="household", noise="local", noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0)
    with pytest.raises(PrivacyError, match="household h2 has mode='household', noise='local'"):
        central_noise_for({"h1": _config(), "h2": local})


def test_poisson_households_rate():
    noise = central_noise_for({f"h{i}": _config(rate=0.3) for i in range(10)})
    rng = random.Random(0)
    counts = [len(poisson_households(noise, rng)) for _ in range(2000)]
    # 20,000 Bernoulli(0.3) draws: mean 3 per round, std of the mean 0.0145.
    assert float(np.mean(counts)) == pytest.approx(3.0, abs=0.06)


# -- DPHomesplitStrategy ---------------------------------------------------


def _device(household: str, name: str, node_id: int, *, owner: bool = False) -> DeviceInfo:
    return DeviceInfo(
        household=household, device=name, address=f"127.0.0.1:{9200 + node_id}", node_id=node_id,
        holds_data=owner, num_examples=50 if owner else 0, memory_bytes=1 << 30,
    )  # fmt: skip


DEVICES = [_device("g", "tablet", 1, owner=True), _device("g", "tv", 2), _device("h", "phone", 3, owner=True), _device("h", "laptop", 4)]
CENTRAL = {"mode": "household", "noise": "central", "target-epsilon": 100.0, "noise-multiplier": SIGMA, "max-grad-norm": BOUND}


def _strategy(privacy: dict, **options) -> DPHomesplitStrategy:
    settings = {household: check_settings(raw, where="privacy") for household, raw in privacy.items()}
    strategy = DPHomesplitStrategy(
        privacy=settings, model_fn=build_model, example_inputs=example_inputs, min_household_devices=2, **options
    )
    strategy.devices = list(DEVICES)
    return strategy


def _train_round(strategy: DPHomesplitStrategy, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
    """Plan, sample, send and aggregate one round in which every stage returns the arrays it was sent."""
    strategy._server_round = server_round
    strategy._arrays = arrays
    plans = strategy._sample_for_training(strategy._plan_all())
    messages = strategy._messages(plans, arrays, ConfigRecord({}), "train", server_round)
    for number, message in enumerate(messages):
        # Flower sets the id when it pushes a message; tests set one by hand.
        message.metadata.__dict__["_message_id"] = f"r{server_round}m{number}"
    replies = [
        Message(
            RecordDict({METRICS: MetricRecord({"num-examples": 50}), ARRAYS: message.content.array_records[ARRAYS]}),
            reply_to=message,
        )
        for message in messages
    ]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    return aggregated


def _moved(after: ArrayRecord, before: ArrayRecord) -> np.ndarray:
    return np.concatenate([(after[k].numpy().astype(np.float64) - before[k].numpy()).ravel() for k in before])


def test_strategy_adds_noise_once_per_round():
    strategy = _strategy({"g": CENTRAL, "h": CENTRAL}, noise_seed=4)
    start = ArrayRecord(build_model().state_dict())

    first = _train_round(strategy, 1, start)
    second = _train_round(strategy, 2, first)

    assert strategy.round_records[1]["households_trained"] == ["g", "h"]
    # Sum of two zero updates plus one draw of std sigma * C, over 2 expected households;
    # a draw per household would give sqrt(2) times as much.
    expected_std = SIGMA * BOUND / 2
    noise_one, noise_two = _moved(first, start), _moved(second, first)
    assert noise_one.size > 20_000
    assert float(noise_one.std()) == pytest.approx(expected_std, rel=0.03)
    assert float(noise_two.std()) == pytest.approx(expected_std, rel=0.03)
    assert abs(float(np.corrcoef(noise_one, noise_two)[0, 1])) < 4 / math.sqrt(noise_one.size)


def test_strategy_skips_household_without_settings(caplog):
    strategy = _strategy({"g": CENTRAL}, noise_seed=0)
    with caplog.at_level(logging.WARNING, logger="homesplit.strategies.privacy"):
        plans = strategy._plan_all()
    assert sorted(plans) == ["g"]
    assert "Household h skipped: it has no privacy settings" in caplog.text


def test_strategy_rejects_mixed_noise():
    with pytest.raises(ConfigError, match=r"households \['g'\] have noise='central' but \['h'\] do not"):
        _strategy({"g": CENTRAL, "h": {**CENTRAL, "noise": "local"}})
