"""``homesplit run EXPERIMENT.yaml``: train the households of an experiment on this machine.

The command validates the experiment, enrolls one TLS bundle per device into
a temporary folder, starts `flower-superlink` and one `flower-supernode` per
device on loopback (`homesplit.federation.LocalFederation`), runs the
experiment's Flower app and writes results.json, metrics.csv and
accuracy.png.

A run in which no household trained in any round exits with code 2 and the
households' failure reasons, after writing the result files. A run in which
households trained in some rounds but not all succeeds with a WARNING that
names the rounds, because its model did learn from the rounds that trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from homesplit.errors import FederationError, TrainingError
from homesplit.experiment import Experiment, household_privacy, load_experiment
from homesplit.federation import WORKDIR_PREFIX, LocalFederation, RunResult, SuperNodeSpec
from homesplit.pki import Household
from homesplit.privacy.settings import encode_run_config
from homesplit.run_report import household_failures, rounds_with_training, write_report

__all__ = ["register", "run_experiment", "supernode_specs", "run_config"]

logger = logging.getLogger(__name__)

# Lines of the streamed run log that the CLI shows: homesplit's round lines,
# each household's plan (stages, cuts and idle devices, logged by
# `homesplit.strategies.planning.plan_one` whenever a household is planned),
# and warnings and errors of homesplit's modules.
_SHOWN = re.compile(r"homesplit round \d+|Household \S+: \d+ stages |(WARNING|ERROR) homesplit\.")

# Subfolder of the run folder with each household's CA and device bundles.
HOUSEHOLDS_FOLDER = "households"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="run an experiment: a local Flower federation of households on loopback",
        description="Validate EXPERIMENT.yaml, start a SuperLink and one SuperNode per device with TLS, "
        "train, and write results.json, metrics.csv and accuracy.png.",
    )
    parser.add_argument("experiment", help="experiment YAML file, e.g. examples/household-digits/experiment.yaml")
    parser.add_argument("--rounds", type=int, help="number of rounds; overrides the file's 'rounds'")
    parser.add_argument("--out", default="results", help="folder for the result files (default: ./results)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="run the SuperLink connections and household links without TLS (debugging only)",
    )
    parser.add_argument(
        "--keep-files",
        action="store_true",
        help="keep the run's temporary folder: Flower logs, TLS certificates, household CAs and device bundles, "
        "private keys included; its path is printed at the end",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    experiment = load_experiment(args.experiment, rounds=args.rounds)
    households = len(experiment.households)
    devices = sum(len(h["devices"]) for h in experiment.households)
    print(
        f"homesplit run: {_count(households, 'household')}, {_count(devices, 'device')}, "
        f"{_count(experiment.config['rounds'], 'round')}, TLS {'off' if args.insecure else 'on'}",
        flush=True,
    )
    try:
        summary = run_experiment(
            experiment, out=Path(args.out), insecure=args.insecure, keep_files=args.keep_files, echo=_echo
        )
    except TrainingError as exc:
        _print_kept_files(exc.summary)
        raise
    trained, ran = len(summary["rounds_with_training"]), summary["rounds_run"]
    partly = "" if trained == ran else f"; households trained in only {trained} of {ran} rounds"
    print(
        f"homesplit run: finished in {summary['seconds']:.1f} s; final accuracy {summary['final_accuracy']:.4f}"
        f"{partly}; results in {args.out}",
        flush=True,
    )
    _print_kept_files(summary)
    return 0


def _print_kept_files(summary: dict[str, Any]) -> None:
    """Print what the kept run folder holds, if `--keep-files` kept one."""
    if not summary.get("files_kept"):
        return
    root = Path(summary["files_kept"])
    parts = []
    if (root / HOUSEHOLDS_FOLDER).is_dir():
        parts.append(f"{HOUSEHOLDS_FOLDER}/ (each household's CA and device bundles)")
    for workdir in sorted(root.glob(f"{WORKDIR_PREFIX}*")):
        parts.append(f"{workdir.name}/ (Flower logs in logs/, SuperLink certificates, Flower state)")
    print(
        f"homesplit run: files kept in {root}: {', '.join(parts) or 'nothing'}; "
        "they include private keys, so delete the folder when done",
        flush=True,
    )


def _count(number: int, noun: str) -> str:
    """Return e.g. "1 round" or "4 rounds"."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _echo(line: str) -> None:
    if _SHOWN.search(line):
        print(line.strip(), flush=True)


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def supernode_specs(experiment: Experiment, bundle_root: Path | None) -> list[SuperNodeSpec]:
    """Return one SuperNodeSpec per device, with free data-plane ports and bundles enrolled under `bundle_root`.

    With `bundle_root` None the household links run without TLS (``insecure-links=true``).
    """
    devices = [(index, household, device) for index, household in enumerate(experiment.households) for device in household["devices"]]
    ports = _free_ports(len(devices))
    specs = []
    for (index, household, device), port in zip(devices, ports):
        node_config: dict[str, Any] = {
            "household": household["id"],
            "device": device["name"],
            "listen": f"127.0.0.1:{port}",
            "holds-data": bool(device["holds-data"]),
        }
        for key in ("idle-watts", "busy-watts"):
            if key in device:
                node_config[key] = float(device[key])
        if device["holds-data"]:
            node_config["partition-id"] = index
            node_config["num-partitions"] = len(experiment.households)
        if bundle_root is None:
            node_config["insecure-links"] = True
        else:
            node_config["bundle"] = str(bundle_root / household["id"] / "bundles" / device["name"])
        specs.append(SuperNodeSpec(f"{household['id']}/{device['name']}", node_config))
    return specs


def enroll_bundles(experiment: Experiment, root: Path) -> None:
    """Create one household CA per household under `root` and enroll every device."""
    for household in experiment.households:
        ca = Household.create(root / household["id"], household["id"])
        for device in household["devices"]:
            ca.enroll(device["name"])


def run_config(experiment: Experiment, result_path: Path) -> dict[str, Any]:
    """Return the ``--run-config`` overrides of the app for this experiment."""
    config = experiment.config
    training = config["training"]
    return {
        "num-server-rounds": config["rounds"],
        "seed": config["seed"],
        "local-epochs": training["local-epochs"],
        "batch-size": training["batch-size"],
        "num-microbatches": training["num-microbatches"],
        "schedule": training["schedule"],
        "max-stages": training["max-stages"],
        "optimizer": json.dumps(training["optimizer"]),
        "partitioner": config["data"]["partitioner"],
        "dirichlet-alpha": float(config["data"]["dirichlet-alpha"]),
        "fraction-evaluate": float(config["evaluation"]["fraction-federated"]),
        "min-available-nodes": sum(len(h["devices"]) for h in experiment.households),
        "connect-timeout": float(config["timeouts"]["connect"]),
        "round-timeout": float(config["timeouts"]["round"]),
        "result-path": str(result_path),
        "privacy": encode_run_config(household_privacy(config)),
        "planner": config["planner"]["objective"],
        "link-probe-seconds": float(config["planner"]["link-probe-seconds"]),
    }


def run_experiment(
    experiment: Experiment,
    *,
    out: Path,
    insecure: bool = False,
    keep_files: bool = False,
    echo=None,
    federation_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `experiment` in a local federation and write the result files into `out`.

    Every process started is stopped before this returns or raises. The run
    works in one temporary folder. Its ``households/`` contains each
    household's CA and device bundles (without `insecure`), and the
    `LocalFederation` working folder contains the Flower logs, the
    SuperLink's certificates and Flower's state. With `keep_files` the whole
    folder stays and the summary names it. Otherwise it is deleted after a
    clean run. After an error the Flower logs stay and the private keys are
    deleted.

    Parameters
    ----------
    experiment : Experiment
        A validated experiment.
    out : Path
        Folder for results.json, metrics.csv and accuracy.png.
    insecure : bool, default False
        Run the SuperLink connections and household links without TLS.
    keep_files : bool, default False
        Keep the run's temporary folder, private keys included.
    echo : callable or None, default None
        Called with each line of the run's streamed log.
    federation_options : dict or None, default None
        Extra keyword arguments of `LocalFederation`.

    Returns
    -------
    dict
        Run summary as results.json stores it: seconds, accuracies, run
        status, the rounds that ran and those in which a household trained,
        each household's failure reasons, and ``files_kept`` (the kept
        folder or None).

    Raises
    ------
    FederationError
        If a component fails; the error names it.
    TrainingError
        If the run finished but no household trained in any round. The
        result files are written first, and the error carries the summary.
    """
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="homesplit-run-"))
    clean = False
    try:
        server, outcome = _run_in(root, experiment, insecure, keep_files, echo, federation_options or {})
        clean = True
    finally:
        _clean_up_run_folder(root, keep_files=keep_files, clean=clean)

    rounds = server["rounds"]
    trained = rounds_with_training(rounds)
    summary = {
        "seconds": time.monotonic() - started,
        "run_seconds": outcome.seconds,
        "run_status": outcome.status,
        "training_status": "trained" if trained else "no household trained",
        "rounds_run": len(rounds),
        "rounds_with_training": trained,
        "household_failures": household_failures(rounds),
        "initial_accuracy": server["initial"]["accuracy"],
        "final_accuracy": rounds[-1]["accuracy"] if rounds else server["initial"]["accuracy"],
        "tls": not insecure,
        "stopped_after_round": server.get("stopped_after_round"),
        "experiment": str(experiment.path),
        "files_kept": str(root) if keep_files else None,
    }
    if not trained:
        summary["error"] = _no_training_message(len(rounds), summary["household_failures"])
    write_report(out, rounds=rounds, config=experiment.config, summary=summary)

    if not trained:
        raise TrainingError(f"{summary['error']}\nThe result files in {out} record every round.", summary=summary)
    untrained = [record["round"] for record in rounds if record["round"] not in trained]
    if untrained:
        logger.warning(
            "No household trained in rounds %s of %d; households_failed in %s names the reasons",
            untrained, len(rounds), out / "results.json",
        )  # fmt: skip
    return summary


def _run_in(
    root: Path,
    experiment: Experiment,
    insecure: bool,
    keep_files: bool,
    echo,
    federation_options: dict[str, Any],
) -> tuple[dict[str, Any], RunResult]:
    """Enroll the devices under `root`, run the federation there and return the ServerApp's results and the outcome."""
    bundle_root = None if insecure else root / HOUSEHOLDS_FOLDER
    if bundle_root is not None:
        enroll_bundles(experiment, bundle_root)
    result_path = root / "server-results.json"
    specs = supernode_specs(experiment, bundle_root)
    options = {
        "startup_timeout": float(experiment.config["timeouts"]["startup"]),
        "keep_files": keep_files,
        "root_dir": root,
    }
    options.update(federation_options)
    with LocalFederation(specs, insecure=insecure, **options) as federation:
        outcome = federation.run(
            experiment.app_dir,
            run_config=run_config(experiment, result_path),
            timeout=float(experiment.config["timeouts"]["run"]),
            on_log=echo,
        )
    if not result_path.is_file():
        raise FederationError(f"the ServerApp wrote no results to {result_path}", component="flwr-serverapp")
    return json.loads(result_path.read_text(encoding="utf-8")), outcome


def _clean_up_run_folder(root: Path, *, keep_files: bool, clean: bool) -> None:
    """Delete the run folder, or after an error only the household private keys, unless `keep_files`."""
    if keep_files:
        if clean:
            logger.info("run files kept in %s", root)
        else:
            logger.warning("run stopped after an error; files kept in %s, private keys included", root)
        return
    if clean:
        shutil.rmtree(root, ignore_errors=True)
        return
    # After an error LocalFederation keeps its logs in its own folder under
    # `root`, without its private key. The household CAs' keys go as well.
    shutil.rmtree(root / HOUSEHOLDS_FOLDER, ignore_errors=True)
    if not any(root.iterdir()):
        root.rmdir()


def _no_training_message(num_rounds: int, failures: dict[str, list[str]]) -> str:
    """Describe a run in which no household trained, with each household's failure reasons."""
    rounds = "the only round" if num_rounds == 1 else f"any of the {num_rounds} rounds"
    lines = [
        f"no household trained in {rounds}, so the model was never updated "
        "and the final accuracy is that of the initial model."
    ]
    if failures:
        lines.append("Failures by household:")
        for household, reasons in failures.items():
            lines += [f"  {household}: {reason}" for reason in reasons]
    else:
        lines.append(
            "No household reported a failure, so none could be planned; the WARNING lines above name "
            "the households that were skipped."
        )
    return "\n".join(lines)
