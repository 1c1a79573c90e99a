"""``homesplit run EXPERIMENT.yaml``: train the households of an experiment on this machine.

The command validates the experiment, enrolls one TLS bundle per device into
a temporary folder, starts `flower-superlink` and one `flower-supernode` per
device on loopback (`homesplit.federation.LocalFederation`), runs the
experiment's Flower app and writes results.json, metrics.csv and
accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from homesplit.errors import FederationError
from homesplit.experiment import Experiment, household_privacy, load_experiment
from homesplit.federation import LocalFederation, SuperNodeSpec
from homesplit.pki import Household
from homesplit.privacy.settings import encode_run_config
from homesplit.run_report import write_report

__all__ = ["register", "run_experiment", "supernode_specs", "run_config"]

# Lines of the streamed run log that the CLI shows: homesplit's round lines,
# and warnings and errors of homesplit's modules.
_SHOWN = re.compile(r"homesplit round \d+|(WARNING|ERROR) homesplit\.")


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
    parser.add_argument("--keep-files", action="store_true", help="keep the temporary folder with logs and certificates")
    parser.set_defaults(handler=_handle)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C, so LocalFederation stops every
    # process it started instead of leaving them running in their own sessions.
    raise KeyboardInterrupt(f"signal {signum}")


def _handle(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    experiment = load_experiment(args.experiment, rounds=args.rounds)
    households = len(experiment.households)
    devices = sum(len(h["devices"]) for h in experiment.households)
    print(
        f"homesplit run: {_count(households, 'household')}, {_count(devices, 'device')}, "
        f"{_count(experiment.config['rounds'], 'round')}, TLS {'off' if args.insecure else 'on'}",
        flush=True,
    )
    summary = run_experiment(
        experiment, out=Path(args.out), insecure=args.insecure, keep_files=args.keep_files, echo=_echo
    )
    print(
        f"homesplit run: finished in {summary['seconds']:.1f} s; final accuracy {summary['final_accuracy']:.4f}; "
        f"results in {args.out}",
        flush=True,
    )
    return 0


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

    Every process started is stopped before this returns or raises.

    Returns
    -------
    dict
        Run summary: seconds, final accuracy, rounds, run status.

    Raises
    ------
    FederationError
        If a component fails; the error names it.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="homesplit-run-") as temporary:
        root = Path(temporary)
        bundle_root = None if insecure else root / "households"
        if bundle_root is not None:
            enroll_bundles(experiment, bundle_root)
        result_path = root / "server-results.json"
        specs = supernode_specs(experiment, bundle_root)
        options = {"startup_timeout": float(experiment.config["timeouts"]["startup"]), "keep_files": keep_files}
        options.update(federation_options or {})
        with LocalFederation(specs, insecure=insecure, **options) as federation:
            outcome = federation.run(
                experiment.app_dir,
                run_config=run_config(experiment, result_path),
                timeout=float(experiment.config["timeouts"]["run"]),
                on_log=echo,
            )
        if not result_path.is_file():
            raise FederationError(f"the ServerApp wrote no results to {result_path}", component="flwr-serverapp")
        server = json.loads(result_path.read_text(encoding="utf-8"))

    rounds = server["rounds"]
    summary = {
        "seconds": time.monotonic() - started,
        "run_seconds": outcome.seconds,
        "run_status": outcome.status,
        "initial_accuracy": server["initial"]["accuracy"],
        "final_accuracy": rounds[-1]["accuracy"] if rounds else server["initial"]["accuracy"],
        "tls": not insecure,
        "stopped_after_round": server.get("stopped_after_round"),
        "experiment": str(experiment.path),
    }
    write_report(out, rounds=rounds, config=experiment.config, summary=summary)
    return summary
