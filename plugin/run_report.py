"""Files that ``homesplit run`` writes: results.json, metrics.csv and accuracy.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["ROUND_FIELDS", "write_report"]

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
    _plot_accuracy(plot, rounds)
    return [results, metrics, plot]


def _plot_accuracy(path: Path, rounds: list[dict[str, Any]]) -> None:
    import matplotlib

    # Agg draws to files only, so no display is needed (servers, CI).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    points = [(r["round"], r["accuracy"]) for r in rounds if r.get("accuracy") is not None]
    if points:
        axis.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o")
    axis.set_xlabel("round")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("centralized test accuracy per round")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
