"""Pipeline schedules as plain data.

A schedule is, for every stage, the ordered list of forward and backward
actions it runs in one mini-batch. It can be printed, checked and tested
without a model. The runtime in `homesplit.stage` executes one stage's list.

Links deliver frames in order, and both schedules here run every stage's
forwards in increasing micro-batch order and its backwards in increasing
micro-batch order, so neighbours always agree on which frame comes next.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from homesplit.errors import ConfigError, ScheduleError

__all__ = [
    "ActionKind",
    "Action",
    "SCHEDULES",
    "stage_actions",
    "pipeline_actions",
    "simulate",
    "format_schedule",
    "peak_in_flight",
]


class ActionKind(enum.Enum):
    """The kind of work in one schedule slot."""

    FORWARD = "F"
    BACKWARD = "B"


@dataclass(frozen=True)
class Action:
    """One unit of work: a forward or backward pass of one micro-batch on one stage."""

    kind: ActionKind
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.microbatch}"


SCHEDULES = ("gpipe", "1f1b")
"""Names accepted by `stage_actions`."""


def _check(num_stages: int, num_microbatches: int, stage: int) -> None:
    if num_stages < 1:
        raise ConfigError(f"num_stages={num_stages} must be at least 1")
    if num_microbatches < 1:
        raise ConfigError(f"num_microbatches={num_microbatches} must be at least 1")
    if not 0 <= stage < num_stages:
        raise ConfigError(f"stage={stage} must be in 0..{num_stages - 1}")


def stage_actions(
    schedule: str, *, stage: int, num_stages: int, num_microbatches: int, forward_only: bool = False
) -> list[Action]:
    """Return the ordered actions of one stage for one mini-batch.

    Parameters
    ----------
    schedule : {"gpipe", "1f1b"}
        GPipe runs every forward, then every backward, and keeps all
        `num_microbatches` activations alive. 1F1B runs ``num_stages - stage - 1``
        warm-up forwards, then alternates one forward with one backward, so
        stage ``s`` keeps at most ``num_stages - s`` micro-batches alive.
    stage : int
        Stage index, from 0 (the data owner) to ``num_stages - 1`` (the loss).
    num_stages : int
        Number of pipeline stages.
    num_microbatches : int
        Micro-batches in this mini-batch.
    forward_only : bool, default False
        Evaluation: forwards only, in order, whatever the schedule.

    Raises
    ------
    ConfigError
        If the schedule name or a count is invalid.
    """
    _check(num_stages, num_microbatches, stage)
    forwards = [Action(ActionKind.FORWARD, stage, m) for m in range(num_microbatches)]
    if forward_only:
        return forwards
    backwards = [Action(ActionKind.BACKWARD, stage, m) for m in range(num_microbatches)]
    if schedule == "gpipe":
        return forwards + backwards
    if schedule == "1f1b":
        warmup = min(num_stages - stage - 1, num_microbatches)
        actions = forwards[:warmup]
        for m in range(warmup, num_microbatches):
            actions.append(forwards[m])
            actions.append(backwards[m - warmup])
        actions.extend(backwards[num_microbatches - warmup :])
        return actions
    raise ConfigError(f"schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")


def pipeline_actions(schedule: str, *, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Return `stage_actions` for every stage, indexed by stage."""
    return [
        stage_actions(schedule, stage=s, num_stages=num_stages, num_microbatches=num_microbatches)
        for s in range(num_stages)
    ]


def simulate(actions: list[list[Action]]) -> list[list[tuple[int, Action]]]:
    """Run a schedule in unit time steps and return when each action ran.

    Every action takes one time unit. A forward on stage ``s > 0`` waits for the
    same micro-batch's forward on stage ``s - 1``; a backward waits for the
    stage's own forward and, below the last stage, for the backward on stage
    ``s + 1``. Sends never block, as with `homesplit.link.SocketLink`.

    Returns
    -------
    list of list of (int, Action)
        Per stage, the start time of each action in order.

    Raises
    ------
    ScheduleError
        If the stages deadlock.
    """
    num_stages = len(actions)
    position = [0] * num_stages
    done: dict[tuple[ActionKind, int, int], int] = {}
    timeline: list[list[tuple[int, Action]]] = [[] for _ in range(num_stages)]
    time = 0
    total = sum(len(a) for a in actions)
    while len(done) < total:
        ready = []
        for s in range(num_stages):
            if position[s] >= len(actions[s]):
                continue
            action = actions[s][position[s]]
            if _dependencies_met(action, num_stages, done, time):
                ready.append(action)
        if not ready:
            pending = [str(actions[s][position[s]]) + f"@stage{s}" for s in range(num_stages) if position[s] < len(actions[s])]
            raise ScheduleError(f"schedule deadlocks at time {time}; waiting actions: {', '.join(pending)}")
        for action in ready:
            done[(action.kind, action.stage, action.microbatch)] = time
            timeline[action.stage].append((time, action))
            position[action.stage] += 1
        time += 1
    return timeline


def _dependencies_met(action: Action, num_stages: int, done: dict, now: int) -> bool:
    def finished(kind: ActionKind, stage: int) -> bool:
        started = done.get((kind, stage, action.microbatch))
        return started is not None and started < now

    if action.kind is ActionKind.FORWARD:
        return action.stage == 0 or finished(ActionKind.FORWARD, action.stage - 1)
    if not finished(ActionKind.FORWARD, action.stage):
        return False
    return action.stage == num_stages - 1 or finished(ActionKind.BACKWARD, action.stage + 1)


def peak_in_flight(actions: list[Action]) -> int:
    """Return the largest number of micro-batches whose activations one stage keeps at once."""
    alive = peak = 0
    for action in actions:
        alive += 1 if action.kind is ActionKind.FORWARD else -1
        peak = max(peak, alive)
    return peak


def format_schedule(actions: list[list[Action]]) -> str:
    """Render a simulated schedule as a text grid, one row per stage.

    Example for GPipe with 2 stages and 2 micro-batches::

        stage 0 | F0 F1 .. .. B0 B1
        stage 1 | .. F0 F1 B0 B1 ..
    """
    timeline = simulate(actions)
    length = max((t for row in timeline for t, _ in row), default=-1) + 1
    lines = []
    for s, row in enumerate(timeline):
        cells = [".."] * length
        for t, action in row:
            cells[t] = str(action).ljust(2)
        lines.append(f"stage {s} | " + " ".join(cells))
    return "\n".join(lines)
