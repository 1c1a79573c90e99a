"""Per-segment clipping bounds: resolved from the experiment's max-grad-norm once the plan's stage count is known."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from homesplit.errors import PrivacyError
from homesplit.household_plan import DeviceInfo
from homesplit.models import mlp
from homesplit.privacy.settings import check_settings, resolve_round, stage_bounds
from homesplit.strategies.privacy import DPHomesplitStrategy

build_model = functools.partial(mlp, in_features=8, hidden=16, depth=4, classes=2)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Give Flower's Message constructor the run and node ids a ServerApp process would have."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_one_number_keeps_whole_model_bound(stages):
    bounds = stage_bounds(1.5, num_stages=stages)
    assert len(bounds) == stages
    assert bounds[0] == pytest.approx(1.5 / math.sqrt(stages))
    assert math.sqrt(sum(b * b for b in bounds)) == pytest.approx(1.5)


def test_list_of_wrong_length_rejected():
    with pytest.raises(PrivacyError) as info:
        stage_bounds([0.5, 0.5], num_stages=3)
    assert "max-grad-norm=[0.5, 0.5] has 2 per-segment bounds, but the household's plan has 3 stages" in str(info.value)
    assert "give 3 bounds, or one number C, which gives each stage C / sqrt(3)" in str(info.value)


def test_resolve_round_needs_stage_count():
    settings = check_settings({"target-epsilon": 8, "clipping": "per_segment"}, where="privacy")
    with pytest.raises(PrivacyError, match="needs the household plan's stage count"):
        resolve_round(settings, dataset_size=100, batch_size=10, local_epochs=1, num_rounds=1)


def _device(household: str, name: str, node_id: int, *, owner: bool = False) -> DeviceInfo:
    return DeviceInfo(
        household=household, device=name, address=f"127.0.0.1:{9300 + node_id}", node_id=node_id,
        holds_data=owner, num_examples=100 if owner else 0, memory_bytes=1 << 30,
    )  # fmt: skip


def _strategy(max_grad_norm) -> DPHomesplitStrategy:
    raw = {"target-epsilon": 8, "noise-multiplier": 1.0, "clipping": "per_segment", "max-grad-norm": max_grad_norm}
    strategy = DPHomesplitStrategy(
        privacy={"*": check_settings(raw, where="privacy")},
        model_fn=build_model, example_inputs=lambda: (torch.zeros(1, 8),), min_household_devices=2,
    )  # fmt: skip
    strategy.devices = [
        _device("g", "tablet", 1, owner=True), _device("g", "tv", 2),
        _device("h", "phone", 3, owner=True), _device("h", "laptop", 4), _device("h", "speaker", 5),
    ]  # fmt: skip
    return strategy


def test_strategy_divides_one_bound_per_plan():
    strategy = _strategy(0.6)

    plans = strategy._plan_all()

    assert {h: p.num_stages for h, p in plans.items()} == {"g": 2, "h": 3}
    assert strategy._round_privacy["g"].config.max_grad_norm == [pytest.approx(0.6 / math.sqrt(2))] * 2
    assert strategy._round_privacy["h"].config.max_grad_norm == [pytest.approx(0.6 / math.sqrt(3))] * 3


def test_strategy_skips_plan_with_other_stage_count(caplog):
    strategy = _strategy([0.2, 0.5])

    with caplog.at_level(logging.WARNING, logger="homesplit.strategies.privacy"):
        plans = strategy._plan_all()

    assert sorted(plans) == ["g"]
    assert strategy._round_privacy["g"].config.max_grad_norm == [0.2, 0.5]
    assert "Household h skipped: its privacy settings cannot be used: max-grad-norm=[0.2, 0.5] has 2" in caplog.text
