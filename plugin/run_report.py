"""Files that ``homesplit run`` writes: results.json, metrics.csv and accuracy.png.

It also reads the outcome of a run from its round records: the rounds in
which a household trained and each household's failure reasons.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ROUND_FIELDS",
    "accuracy_figure",
    "accuracy_points",
    "household_failures",
    "rounds_with_training",
    "write_report",
]

ROUND_FIELDS = (
    "round",
    "households_trained",
    "households_failed",
    "train_loss",
    "eval_loss",
    "accuracy",
    "link_bytes",
    "seconds",
)


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """Return one round as CSV cells: household lists become counts joined by names."""
    row = {key: record.get(key) for key in ROUND_FIELDS}
    row["households_trained"] = len(record.get("households_trained") or [])
    row["households_failed"] = len(record.get("households_failed") or {})
    return row


def write_report(out: Path, *, rounds: list[dict[str, Any]], config: dict[str, Any], summary: dict[str, Any]) -> list[Path]:
    """Write results.json, metrics.csv and accuracy.png into `out` and return their paths.

    Parameters
    ----------
    rounds : list of dict
        One record per round with at least the keys of `ROUND_FIELDS`.
    config : dict
        The full experiment configuration, stored in results.json.
    summary : dict
        Run-level figures (wall time, final accuracy, command) for results.json.
        Its ``initial_accuracy``, the evaluation before the first round, is
        plotted as round 0 unless it is missing or None.
    """
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    results.write_text(json.dumps({"summary": summary, "rounds": rounds, "config": config}, indent=2), encoding="utf-8")

    metrics = out / "metrics.csv"
    with metrics.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROUND_FIELDS)
        writer.writeheader()
        for record in rounds:
            writer.writerow(_flat(record))

    plot = out / "accuracy.png"
    figure = accuracy_figure(rounds, initial_accuracy=summary.get("initial_accuracy"))
    figure.savefig(plot, dpi=100)
    return [results, metrics, plot]


def rounds_with_training(rounds: list[dict[str, Any]]) -> list[int]:
    """Return the numbers of the rounds in which at least one household trained."""
    return [int(record["round"]) for record in rounds if record.get("households_trained")]


def household_failures(rounds: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Return each household's distinct failure reasons over all rounds.

    A reason is ``"device D in rounds 1-4: ERROR"`` for a failed stage, or
    ``"declined round 3"`` for a household that declined a DP round. The
    same error of the same device in several rounds is one reason, and
    households are in id order.
    """
    # household -> (device or None for a declined round, error) -> rounds
    seen: dict[str, dict[tuple[str | None, str], list[int]]] = {}
    for record in rounds:
        number = int(record["round"])
        for household, devices in (record.get("households_failed") or {}).items():
            for device, error in devices.items():
                seen.setdefault(household, {}).setdefault((device, str(error)), []).append(number)
        for household in record.get("households_declined") or []:
            seen.setdefault(household, {}).setdefault((None, ""), []).append(number)

    failures = {}
    for household, reasons in sorted(seen.items()):
        failures[household] = [
            f"declined {_round_list(numbers)}" if device is None else f"device {device} in {_round_list(numbers)}: {error}"
            for (device, error), numbers in reasons.items()
        ]
    return failures


def _round_list(numbers: list[int]) -> str:
    """Return e.g. "round 2", "rounds 1-4" for consecutive rounds, or "rounds 1, 3"."""
    if len(numbers) == 1:
        return f"round {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"rounds {numbers[0]}-{numbers[-1]}"
    return "rounds " + ", ".join(str(number) for number in numbers)


def accuracy_points(rounds: list[dict[str, Any]], *, initial_accuracy: float | None) -> list[tuple[int, float]]:
    """Return (round, accuracy) pairs in round order, with round 0 first if `initial_accuracy` is not None."""
    points = [(0, float(initial_accuracy))] if initial_accuracy is not None else []
    points += [(int(r["round"]), float(r["accuracy"])) for r in rounds if r.get("accuracy") is not None]
    return sorted(points)


def accuracy_figure(rounds: list[dict[str, Any]], *, initial_accuracy: float | None) -> Figure:
    """Draw the centralized test accuracy (%) per round, with integer round ticks.

    The y-axis spans the accuracies with a margin of at least 5 percentage
    points and stays within 0 to 100, so that a single round does not fill
    the plot with a range of a fraction of a point.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A bare Figure, unlike pyplot's, needs no display backend and no closing.
    figure = Figure(figsize=(5, 3.2))
    axis = figure.subplots()
    points = accuracy_points(rounds, initial_accuracy=initial_accuracy)
    if points:
        xs = [round_number for round_number, _ in points]
        ys = [100 * accuracy for _, accuracy in points]
        axis.plot(xs, ys, marker="o")
        axis.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
        margin = max(5.0, 0.1 * (max(ys) - min(ys)))
        axis.set_ylim(max(0.0, min(ys) - margin), min(100.0, max(ys) + margin))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("round (0: before training)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("centralized test accuracy per round")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure
