"""Schedules are plain data: check their order, memory and deadlock freedom without a model."""

from __future__ import annotations

import pytest

from homesplit.errors import ConfigError, ScheduleError
from homesplit.schedule import (
    Action,
    ActionKind,
    format_schedule,
    peak_in_flight,
    pipeline_actions,
    simulate,
    stage_actions,
)

CASES = [(s, m) for s in (1, 2, 3, 4, 5) for m in (1, 2, 3, 4, 7, 16)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("stages", "microbatches"), CASES)
def test_schedule_runs_every_action_once(schedule, stages, microbatches):
    actions = pipeline_actions(schedule, num_stages=stages, num_microbatches=microbatches)
    for stage, row in enumerate(actions):
        forwards = [a.microbatch for a in row if a.kind is ActionKind.FORWARD]
        backwards = [a.microbatch for a in row if a.kind is ActionKind.BACKWARD]
        assert forwards == list(range(microbatches))
        assert backwards == list(range(microbatches))
        assert all(a.stage == stage for a in row)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("stages", "microbatches"), CASES)
def test_schedule_never_deadlocks(schedule, stages, microbatches):
    timeline = simulate(pipeline_actions(schedule, num_stages=stages, num_microbatches=microbatches))
    assert sum(len(row) for row in timeline) == 2 * stages * microbatches


@pytest.mark.parametrize(("stages", "microbatches"), CASES)
def test_1f1b_keeps_at_most_stages_minus_index(stages, microbatches):
    for stage in range(stages):
        actions = stage_actions("1f1b", stage=stage, num_stages=stages, num_microbatches=microbatches)
        assert peak_in_flight(actions) == min(stages - stage, microbatches)


@pytest.mark.parametrize(("stages", "microbatches"), CASES)
def test_gpipe_keeps_every_microbatch(stages, microbatches):
    for stage in range(stages):
        actions = stage_actions("gpipe", stage=stage, num_stages=stages, num_microbatches=microbatches)
        assert peak_in_flight(actions) == microbatches


def test_gpipe_makespan_is_textbook():
    # Forward and backward fill and drain: 2 * (M + S - 1) unit slots.
    timeline = simulate(pipeline_actions("gpipe", num_stages=3, num_microbatches=4))
    end = max(t for row in timeline for t, _ in row) + 1
    assert end == 2 * (4 + 3 - 1)


def test_forward_only_has_no_backward():
    actions = stage_actions("1f1b", stage=1, num_stages=3, num_microbatches=5, forward_only=True)
    assert [str(a) for a in actions] == ["F0", "F1", "F2", "F3", "F4"]


def test_schedule_prints_as_grid():
    text = format_schedule(pipeline_actions("gpipe", num_stages=2, num_microbatches=2))
    assert text.splitlines() == ["stage 0 | F0 F1 .. .. B0 B1", "stage 1 | .. F0 F1 B0 B1 .."]


def test_simulate_reports_deadlock():
    # Stage 1 wants micro-batch 1 before micro-batch 0 arrives backwards: impossible.
    bad = [
        [Action(ActionKind.FORWARD, 0, 0), Action(ActionKind.BACKWARD, 0, 0)],
        [Action(ActionKind.BACKWARD, 1, 0), Action(ActionKind.FORWARD, 1, 0)],
    ]
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "zigzag", "stage": 0, "num_stages": 2, "num_microbatches": 2}, "zigzag"),
        ({"schedule": "gpipe", "stage": 2, "num_stages": 2, "num_microbatches": 2}, "stage=2"),
        ({"schedule": "gpipe", "stage": 0, "num_stages": 2, "num_microbatches": 0}, "num_microbatches=0"),
        ({"schedule": "gpipe", "stage": 0, "num_stages": 0, "num_microbatches": 1}, "num_stages=0"),
    ],
)
def test_stage_actions_rejects_bad_input(kwargs, message):
    schedule = kwargs.pop("schedule")
    with pytest.raises(ConfigError, match=message):
        stage_actions(schedule, **kwargs)
