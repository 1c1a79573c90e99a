"""``homesplit sweep EXPERIMENT.yaml --epsilon 0.5,1,2,4,8,inf``: accuracy against the privacy budget.

The command runs the experiment once per target epsilon and seed, each time
with ``homesplit run``'s code path. Every household trains with the
experiment's privacy settings (sample-level DP-SGD by default) and the
target epsilon of the run. ``noise-multiplier: auto`` makes every household
calibrate sigma for that target over the whole run with
`homesplit.privacy.calibrate_noise_multiplier`; ``inf`` means clipping
without noise. The results go to sweep.csv (one row per run), sweep.md (mean
and standard deviation over the seeds) and accuracy_vs_epsilon.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from homesplit.cli_run import run_experiment
from homesplit.errors import ConfigError, TrainingError
from homesplit.experiment import Experiment, load_experiment, with_defaults
from homesplit.privacy.settings import check_settings
from homesplit.run_report import rounds_with_training

__all__ = ["register", "parse_epsilons", "sweep_experiment", "run_sweep", "summarize", "write_sweep"]

RUN_FIELDS = (
    "target_epsilon",
    "seed",
    "final_accuracy",
    "epsilon_spent",
    "noise_multiplier",
    "sample_rate",
    "rounds_trained",
    "seconds",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    parser = subparsers.add_parser(
        "sweep",
        help="run an experiment once per privacy budget and seed; table and plot of accuracy against epsilon",
        description="Run EXPERIMENT.yaml with DP once per target epsilon and seed, calibrating sigma for each "
        "target, and write sweep.csv, sweep.md and accuracy_vs_epsilon.png.",
    )
    parser.add_argument("experiment", help="experiment YAML file, e.g. examples/household-digits/experiment.yaml")
    parser.add_argument(
        "--epsilon", required=True, help="comma-separated target epsilons, e.g. 0.5,1,2,4,8,inf (inf: no noise)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs per epsilon, with seeds seed, seed+1, ... (default: 1)")
    parser.add_argument("--rounds", type=int, help="number of rounds; overrides the file's 'rounds'")
    parser.add_argument("--out", default="sweep", help="folder for the sweep files and each run's files (default: ./sweep)")
    parser.add_argument("--insecure", action="store_true", help="run without TLS (debugging only)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished runs with the same settings found in --out, e.g. after an interruption or to add seeds",
    )
    parser.set_defaults(handler=_handle)


def parse_epsilons(text: str) -> list[float]:
    """Parse ``"0.5,1,inf"`` into target epsilons.

    Raises
    ------
    ConfigError
        If an entry is not a number > 0 or inf, or the list is empty.
    """
    values = []
    for part in text.split(","):
        try:
            value = float(part.strip())
        except ValueError:
            value = math.nan
        if not value > 0:
            raise ConfigError(f"--epsilon entry {part.strip()!r} is invalid; allowed: numbers > 0 or inf, e.g. 0.5,1,8,inf")
        values.append(value)
    if not values:
        raise ConfigError("--epsilon is empty; give target epsilons such as 0.5,1,2,4,8,inf")
    return values


def sweep_experiment(experiment: Experiment, *, target_epsilon: float, seed: int) -> Experiment:
    """Return `experiment` with every household at `target_epsilon`, sigma calibrated for it, and `seed`.

    Households keep their other privacy settings; those without any get the
    defaults of `homesplit.privacy.settings` (sample-level DP-SGD, C = 1).
    """
    config = json.loads(json.dumps(experiment.config))
    config["seed"] = seed
    shared = config.get("privacy") or {}
    overrides = {"target-epsilon": target_epsilon, "noise-multiplier": "auto"}
    config["privacy"] = check_settings({**shared, **overrides}, where="privacy")
    for index, household in enumerate(config["households"]):
        own = household.get("privacy") or shared
        household["privacy"] = check_settings({**own, **overrides}, where=f"households[{index}].privacy")
    return Experiment(path=experiment.path, app_dir=experiment.app_dir, config=config, num_layers=experiment.num_layers)


def _run_row(results: dict[str, Any], *, target_epsilon: float, seed: int) -> dict[str, Any]:
    """Return one row of sweep.csv from a run's results.json content."""
    trained = [r for r in results["rounds"] if r.get("privacy")]
    last = trained[-1]["privacy"] if trained else {}
    spent = [r for r in last.values() if r.get("status") == "ok"]
    return {
        "target_epsilon": target_epsilon,
        "seed": seed,
        "final_accuracy": results["summary"]["final_accuracy"],
        "epsilon_spent": max((r["epsilon"] for r in spent), default=0.0),
        "noise_multiplier": min((r["noise_multiplier"] for r in spent), default=None),
        "sample_rate": max((r["sample_rate"] for r in spent), default=None),
        "rounds_trained": len(trained),
        "seconds": round(results["summary"]["seconds"], 1),
    }


# Settings that change how long a run may take or where its files are, not
# what it computes, so a finished run can be reused across them.
_NOT_COMPARED = ("timeouts", "app")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    # The JSON round trip turns tuples into lists, as in results.json.
    return json.loads(json.dumps({key: value for key, value in config.items() if key not in _NOT_COMPARED}))


def finished_run(run_dir: Path, variant: Experiment) -> dict[str, Any] | None:
    """Return the results of a finished run of `variant` in `run_dir`, or None if there is none.

    A run in which no household trained counts as not finished, so that
    ``--resume`` runs it again.

    Raises
    ------
    ConfigError
        If `run_dir` holds the results of a run with other settings.
    """
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        config = results["config"]
        status = results["summary"]["run_status"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a readable results file ({exc}); delete {run_dir} to run it again") from exc
    try:
        config = with_defaults(config)
    except ConfigError:
        pass  # A key this version no longer knows: the comparison below fails.
    if _comparable(config) != _comparable(variant.config):
        raise ConfigError(
            f"{run_dir} holds a run with other settings than this sweep's; "
            "choose another --out, or delete that folder to run it again"
        )
    if not str(status).startswith("finished:completed"):
        return None
    # Read from the rounds, so results files written before the summary
    # recorded a training status are checked as well.
    if not rounds_with_training(results.get("rounds") or []):
        return None
    return results


def run_sweep(
    experiment: Experiment,
    *,
    epsilons: list[float],
    seeds: int,
    out: Path,
    insecure: bool = False,
    resume: bool = False,
    echo=None,
    report=None,
) -> list[dict[str, Any]]:
    """Run the experiment for every target epsilon and seed and return one row per run.

    Each run writes its own results into ``out/epsilon-E/seed-S``. With
    `resume`, a run whose folder already holds finished results of the same
    settings is not run again, so an interrupted sweep, or one with more
    seeds, repeats no work. `report` is called with a line for each reused run.

    Raises
    ------
    TrainingError
        If no household trained in some run. The sweep stops there, because
        that run's accuracy is the initial model's, and the cause usually
        fails every run. With `resume`, such a run is run again.
    """
    rows = []
    base_seed = int(experiment.config["seed"])
    for epsilon in epsilons:
        for offset in range(seeds):
            seed = base_seed + offset
            variant = sweep_experiment(experiment, target_epsilon=epsilon, seed=seed)
            run_dir = out / f"epsilon-{epsilon:g}" / f"seed-{seed}"
            results = finished_run(run_dir, variant) if resume else None
            if results is None:
                try:
                    run_experiment(variant, out=run_dir, insecure=insecure, echo=echo)
                except TrainingError as exc:
                    # The causes seen so far (a device that cannot run the model,
                    # an optimizer that fails) would fail every further run too.
                    raise TrainingError(
                        f"sweep stopped at target epsilon {epsilon:g}, seed {seed}: {exc}\n"
                        f"The runs that trained stay in {out}, and --resume reuses them.",
                        summary=exc.summary,
                    ) from exc
                results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
            elif report is not None:
                report(f"reusing the finished run in {run_dir}")
            rows.append(_run_row(results, target_epsilon=epsilon, seed=seed))
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return per target epsilon the mean and sample standard deviation of the final accuracy over seeds."""
    table = []
    for epsilon in sorted({row["target_epsilon"] for row in rows}):
        runs = [row for row in rows if row["target_epsilon"] == epsilon]
        accuracies = [row["final_accuracy"] for row in runs]
        sigmas = [row["noise_multiplier"] for row in runs if row["noise_multiplier"] is not None]
        table.append(
            {
                "target_epsilon": epsilon,
                "runs": len(runs),
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "epsilon_spent_max": max(row["epsilon_spent"] for row in runs),
                "noise_multiplier": statistics.fmean(sigmas) if sigmas else None,
            }
        )
    return table


def write_sweep(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write sweep.csv, sweep.md and accuracy_vs_epsilon.png into `out` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(rows)

    csv_path = out / "sweep.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    lines = [
        "| target epsilon | runs | accuracy mean | accuracy std | max epsilon spent | sigma |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in table:
        sigma = "" if entry["noise_multiplier"] is None else f"{entry['noise_multiplier']:.3f}"
        lines.append(
            f"| {entry['target_epsilon']:g} | {entry['runs']} | {entry['accuracy_mean']:.4f} | "
            f"{entry['accuracy_std']:.4f} | {entry['epsilon_spent_max']:.3f} | {sigma} |"
        )
    markdown_path = out / "sweep.md"
    markdown_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    plot_path = out / "accuracy_vs_epsilon.png"
    _plot(plot_path, table)
    return [csv_path, markdown_path, plot_path]


def _plot(path: Path, table: list[dict[str, Any]]) -> None:
    import matplotlib

    # Agg draws to files only, so no display is needed (servers, CI).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    finite = [entry for entry in table if math.isfinite(entry["target_epsilon"])]
    if finite:
        axis.errorbar(
            [e["target_epsilon"] for e in finite],
            [100 * e["accuracy_mean"] for e in finite],
            yerr=[100 * e["accuracy_std"] for e in finite],
            marker="o",
            capsize=3,
            label="DP-SGD",
        )
        axis.set_xscale("log")
        # Label the budgets themselves: log-scale ticks such as 3x10^0 overlap.
        targets = [e["target_epsilon"] for e in finite]
        axis.set_xticks(targets, [f"{target:g}" for target in targets])
        axis.minorticks_off()
    for entry in table:
        if not math.isfinite(entry["target_epsilon"]):
            mean, std = 100 * entry["accuracy_mean"], 100 * entry["accuracy_std"]
            axis.axhline(mean, color="grey", linestyle="--", label="epsilon = inf (clipping, no noise)")
            if std > 0:
                axis.axhspan(mean - std, mean + std, color="grey", alpha=0.15)
    axis.set_xlabel("target epsilon")
    axis.set_ylabel("final test accuracy (%)")
    axis.set_title("accuracy against the privacy budget")
    axis.grid(True, alpha=0.3)
    if table:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _handle(args: argparse.Namespace) -> int:
    epsilons = parse_epsilons(args.epsilon)
    if args.seeds < 1:
        raise ConfigError(f"--seeds={args.seeds} is invalid; allowed: an integer of at least 1")
    experiment = load_experiment(args.experiment, rounds=args.rounds)
    # Build every variant first, so an invalid setting fails before any run starts.
    for epsilon in epsilons:
        sweep_experiment(experiment, target_epsilon=epsilon, seed=int(experiment.config["seed"]))
    out = Path(args.out)
    print(f"homesplit sweep: {len(epsilons)} budgets x {args.seeds} seeds, {experiment.config['rounds']} rounds each", flush=True)

    def echo(line: str) -> None:
        if "homesplit round" in line or "spent epsilon" in line or "training stops" in line:
            print(line.strip(), flush=True)

    def report(line: str) -> None:
        print(f"homesplit sweep: {line}", flush=True)

    try:
        rows = run_sweep(
            experiment, epsilons=epsilons, seeds=args.seeds, out=out, insecure=args.insecure, resume=args.resume, echo=echo, report=report
        )
    except KeyboardInterrupt:
        # The interrupted run wrote no results.json, so --resume runs it again.
        print(f"homesplit sweep: interrupted. Run the same command with --resume to reuse the finished runs in {out}", file=sys.stderr, flush=True)
        raise
    paths = write_sweep(out, rows)
    print((out / "sweep.md").read_text(encoding="utf-8"), end="", flush=True)
    print(f"homesplit sweep: wrote {', '.join(str(p) for p in paths)}", flush=True)
    return 0
