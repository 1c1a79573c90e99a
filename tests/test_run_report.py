"""Tests of the result files that ``homesplit run`` writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from homesplit.run_report import (
    accuracy_figure,
    accuracy_points,
    household_failures,
    rounds_with_training,
    write_report,
)


def round_record(number: int, accuracy: float) -> dict[str, object]:
    return {
        "round": number,
        "households_trained": ["household-a", "household-b"],
        "households_failed": {},
        "train_loss": 0.5,
        "eval_loss": 0.4,
        "accuracy": accuracy,
        "link_bytes": 1000,
        "seconds": 2.0,
    }


def test_accuracy_points_start_at_round_zero() -> None:
    points = accuracy_points([round_record(1, 0.8), round_record(2, 0.9)], initial_accuracy=0.1)

    assert points == [(0, 0.1), (1, 0.8), (2, 0.9)]


def test_accuracy_points_without_initial_evaluation() -> None:
    points = accuracy_points([round_record(1, 0.8)], initial_accuracy=None)

    assert points == [(1, 0.8)]


def test_accuracy_figure_ticks_are_whole_rounds() -> None:
    for count in (1, 3, 7, 40):
        rounds = [round_record(number, 0.5 + number / 100) for number in range(1, count + 1)]
        axis = accuracy_figure(rounds, initial_accuracy=0.1).axes[0]
        low, high = axis.get_xlim()
        ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]

        assert ticks, count
        assert all(float(tick).is_integer() for tick in ticks), (count, ticks)
        assert 0 in ticks, (count, ticks)


def test_accuracy_figure_single_round_y_range() -> None:
    axis = accuracy_figure([round_record(1, 0.8194)], initial_accuracy=None).axes[0]
    low, high = axis.get_ylim()

    assert low <= 81.94 <= high
    assert high - low >= 10.0
    assert low >= 0.0
    assert high <= 100.0


def test_accuracy_figure_y_range_stays_within_percent() -> None:
    axis = accuracy_figure([round_record(1, 1.0)], initial_accuracy=0.0).axes[0]

    assert axis.get_ylim() == (0.0, 100.0)


def test_write_report_writes_three_files(tmp_path: Path) -> None:
    rounds = [round_record(1, 0.8)]
    summary = {"initial_accuracy": 0.1, "final_accuracy": 0.8}

    paths = write_report(tmp_path / "out", rounds=rounds, config={"rounds": 1}, summary=summary)

    assert [path.name for path in paths] == ["results.json", "metrics.csv", "accuracy.png"]
    assert json.loads(paths[0].read_text())["summary"] == summary
    with paths[1].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["households_trained"] == "2"
    assert paths[2].read_bytes().startswith(b"\x89PNG")


def test_rounds_with_training_skips_empty_rounds() -> None:
    failed = {"households_trained": [], "households_failed": {"household-a": {"phone": "no reply"}}}
    rounds = [round_record(1, 0.5), {**round_record(2, 0.5), **failed}, round_record(3, 0.6)]

    assert rounds_with_training(rounds) == [1, 3]
    assert rounds_with_training([{**round_record(1, 0.1), **failed}]) == []
    assert rounds_with_training([]) == []


def test_household_failures_merge_repeated_errors() -> None:
    error = "error code 0: ConfigError: invalid options {'lr': 0.1}"
    rounds = []
    for number in (1, 2, 3):
        record = {**round_record(number, 0.1), "households_trained": []}
        record["households_failed"] = {"household-b": {"laptop": error}, "household-a": {"phone": f"timeout {number}"}}
        rounds.append(record)
    rounds[2]["households_failed"]["household-b"]["phone"] = "no reply before the round's timeout"
    rounds[1]["households_declined"] = ["household-c"]
    del rounds[1]["households_failed"]["household-a"]

    failures = household_failures(rounds)

    assert list(failures) == ["household-a", "household-b", "household-c"]
    assert failures["household-a"] == ["device phone in round 1: timeout 1", "device phone in round 3: timeout 3"]
    assert failures["household-b"] == [
        f"device laptop in rounds 1-3: {error}",
        "device phone in round 3: no reply before the round's timeout",
    ]
    assert failures["household-c"] == ["declined round 2"]


def test_household_failures_lists_gaps() -> None:
    rounds = [{"round": n, "households_failed": {"household-a": {"pi": "lost"}}} for n in (1, 2, 4)]

    assert household_failures(rounds) == {"household-a": ["device pi in rounds 1, 2, 4: lost"]}
