"""A local Flower federation on loopback, built from Flower's own programs.

`LocalFederation` starts `flower-superlink` and one `flower-supernode` per
device as subprocesses, with TLS from a throwaway CA, free ports chosen at run
time and one `--node-config` per device. With a `SimulationSpec` it starts a
simulation SuperLink instead, and Flower's Ray engine simulates the
SuperNodes. It then runs a Flower app with
`flwr run APP CONNECTION --stream` and stops every process it started, on
success, on error and on Ctrl-C. The core package never imports Flower; this
module only runs Flower's command-line programs.

While a federation runs, this process is a child subreaper on Linux, so that
it can reap the orphans of a SuperNode that died (see `process_tree`).

Example
-------
>>> devices = [
...     SuperNodeSpec("household-a/laptop", {"household": "household-a", "device": "laptop"}),
...     SuperNodeSpec("household-a/phone", {"household": "household-a", "device": "phone"}),
... ]
>>> with LocalFederation(devices) as federation:  # doctest: +SKIP
...     result = federation.run("examples/household-digits", run_config={"num-rounds": 2})
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from homesplit.errors import ConfigError, FederationError
from homesplit.federation_certs import ServerCertificates, write_loopback_certificates
from homesplit.flower_config import ConfigValue, format_config, toml_string
from homesplit.process_tree import (
    ManagedProcess,
    ProcessTracker,
    describe_exit,
    set_child_subreaper,
    strip_ansi,
)

__all__ = ["LocalFederation", "RunResult", "SimulationSpec", "SuperNodeSpec"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CONNECTION_NAME = "homesplit-local"
# Name prefix of the working folder that `LocalFederation.start` creates.
WORKDIR_PREFIX = "homesplit-federation-"

# Log lines of Flower 1.42 serve as readiness and result signals, because
# Flower offers no other signal that works without importing Flower.
# flower-supernode logs this once it has registered and activated itself.
_SUPERNODE_READY = re.compile(r"SuperNode ID: (\d+)")
# `flwr run` prints this once the SuperLink accepted the run.
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")

_POLL_INTERVAL = 0.2
_CLI_TIMEOUT = 60.0


@dataclass(frozen=True)
class SuperNodeSpec:
    """One device of the federation: a SuperNode name and its node config.

    Parameters
    ----------
    name : str
        Unique name in logs and errors, e.g. ``"household-a/phone"``.
    node_config : Mapping[str, str | int | float | bool], default {}
        Passed to ``flower-supernode --node-config``; the ClientApp reads it
        as ``context.node_config``.
    """

    name: str
    node_config: Mapping[str, ConfigValue] = field(default_factory=dict)


@dataclass(frozen=True)
class SimulationSpec:
    """A federation simulated by Flower's Ray simulation engine.

    Parameters
    ----------
    num_supernodes : int
        Number of simulated SuperNodes; each ClientApp finds its index as
        ``context.node_config["partition-id"]`` (0 to num_supernodes - 1) and
        the count as ``context.node_config["num-partitions"]``.
    clientapp_cpus : int, default 1
        Ray CPUs reserved per ClientApp (``client-resources-num-cpus``; Flower
        1.42 accepts integers only and defaults to 2).
    ray_cpus : int or None, default None
        CPUs that Ray may hand out in total (``init-args-num-cpus``); None lets
        Ray count the machine's cores. At most ``ray_cpus // clientapp_cpus``
        ClientApps run at once, so a value above the core count runs more of
        them concurrently, time-sharing the cores.
    """

    num_supernodes: int
    clientapp_cpus: int = 1
    ray_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.num_supernodes < 1:
            raise ConfigError(f"SimulationSpec.num_supernodes={self.num_supernodes} must be at least 1")
        if self.clientapp_cpus < 1:
            raise ConfigError(
                f"SimulationSpec.clientapp_cpus={self.clientapp_cpus} must be a positive integer, "
                "because Flower 1.42 rejects fractional client-resources-num-cpus"
            )
        if self.ray_cpus is not None and self.ray_cpus < self.clientapp_cpus:
            raise ConfigError(
                f"SimulationSpec.ray_cpus={self.ray_cpus} is below clientapp_cpus={self.clientapp_cpus}, "
                "so no ClientApp could ever run; raise ray_cpus or lower clientapp_cpus"
            )

    def federation_config(self) -> dict[str, ConfigValue]:
        """Return the ``flwr run --federation-config`` keys of this simulation."""
        config: dict[str, ConfigValue] = {
            "num-supernodes": self.num_supernodes,
            "client-resources-num-cpus": self.clientapp_cpus,
        }
        if self.ray_cpus is not None:
            config["init-args-num-cpus"] = self.ray_cpus
        return config


@dataclass(frozen=True)
class RunResult:
    """Outcome of one `flwr run`.

    Parameters
    ----------
    run_id : int
        Run id that the SuperLink assigned.
    status : str
        Final status from ``flwr ls``, e.g. ``"finished:completed"``.
    seconds : float
        Wall-clock time from starting `flwr run` until it exited.
    log_path : Path
        File with the run's streamed logs.
    lost_supernodes : tuple of str
        SuperNodes that exited during the run (only with
        ``stop_on_supernode_exit=False``).
    """

    run_id: int
    status: str
    seconds: float
    log_path: Path
    lost_supernodes: tuple[str, ...] = ()


class LocalFederation:
    """A SuperLink and SuperNodes on loopback, stopped by PID when done.

    Use it as a context manager: entering starts the processes and waits until
    every SuperNode has registered, leaving stops them all. `run` may be called
    several times in between. Start, run and stop it from one thread that
    lives as long as the federation: on Linux every component gets SIGTERM
    when the thread that started it ends, so that a launcher killed with
    SIGKILL leaves nothing behind.

    Parameters
    ----------
    supernodes : Sequence[SuperNodeSpec], default ()
        One entry per device, each run by a `flower-supernode` process; names
        must be unique. Leave empty when `simulation` is given.
    simulation : SimulationSpec or None, default None
        Run the SuperLink with ``--simulation`` instead, so `flwr run` simulates
        the SuperNodes with Flower's Ray engine (needs ``flwr[simulation]``).
    insecure : bool, default False
        Run without TLS. Only for debugging: by default a throwaway CA and a
        SuperLink certificate for ``127.0.0.1``, ``::1`` and ``localhost`` are
        generated, and SuperNodes and `flwr` verify the SuperLink against it.
    root_dir : Path or None, default None
        Folder in which the temporary working folder is created; None uses the
        system's temporary folder.
    keep_files : bool, default False
        Keep the whole working folder (logs, certificates with the
        SuperLink's private key, Flower state) after the stop; its path is
        logged. Without it, a clean stop deletes the folder, and a stop after
        an error or an interrupt keeps it but deletes the private key.
    startup_timeout : float, default 60.0
        Seconds to wait for the SuperLink to accept connections and for every
        SuperNode to register.
    stop_timeout : float, default 10.0
        Seconds each component may take to exit on SIGTERM before it gets
        SIGKILL. The programs that Flower starts get SIGKILL once they still
        run 2 s after SIGTERM (`ProcessTracker.stop_all`).
    stop_on_supernode_exit : bool, default True
        If True, a SuperNode that exits during a run stops the federation and
        `run` raises `FederationError` naming it. If False, the exit is logged
        as a warning and the run goes on, so a strategy can drop that device.
    env : Mapping[str, str] or None, default None
        Extra environment variables for every Flower process.

    Raises
    ------
    ConfigError
        If names repeat, neither or both of `supernodes` and `simulation` are
        given, or a node config cannot be passed to Flower.
    """

    def __init__(
        self,
        supernodes: Sequence[SuperNodeSpec] = (),
        *,
        simulation: SimulationSpec | None = None,
        insecure: bool = False,
        root_dir: Path | None = None,
        keep_files: bool = False,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        stop_on_supernode_exit: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if bool(supernodes) == (simulation is not None):
            raise ConfigError(
                "LocalFederation needs either SuperNodeSpecs (deployment) or a SimulationSpec "
                f"(simulation); got {len(supernodes)} SuperNodeSpecs and simulation={simulation!r}"
            )
        names = [spec.name for spec in supernodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"SuperNode names must be unique; repeated: {duplicates}")
        for value, name in ((startup_timeout, "startup_timeout"), (stop_timeout, "stop_timeout")):
            if not value > 0:
                raise ConfigError(f"LocalFederation {name}={value!r} must be a positive number of seconds")

        self.supernodes = list(supernodes)
        self.simulation = simulation
        # Format now, so a bad node config fails before any process starts.
        self._node_config_args = {spec.name: format_config(spec.node_config) for spec in supernodes}
        self.insecure = insecure
        self.keep_files = keep_files
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.stop_on_supernode_exit = stop_on_supernode_exit
        self._root_dir = root_dir
        self._extra_env = dict(env or {})

        self.workdir: Path | None = None
        self.superlink_address: str | None = None
        self.certificates: ServerCertificates | None = None
        self.node_ids: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._tracker = ProcessTracker()
        self._superlink: ManagedProcess | None = None
        self._supernode_processes: dict[str, ManagedProcess] = {}
        self._lost: set[str] = set()
        self._previous_subreaper: bool | None = None
        self._stopped = False

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.stop(failed=exc_type is not None, interrupted=interrupted)

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of every Flower process; its config.toml names the SuperLink."""
        return self._require_workdir() / "flwr-home"

    @property
    def log_dir(self) -> Path:
        """Folder with one log file per component and per run."""
        return self._require_workdir() / "logs"

    @property
    def pids(self) -> dict[str, int]:
        """PID of each started component, by component name."""
        return {process.name: process.pid for process in self._tracker.processes}

    def supernode_pid(self, name: str) -> int:
        """Return the PID of the `flower-supernode` of device `name`."""
        return self._supernode_processes[name].pid

    def live_pids(self) -> list[int]:
        """Return the PIDs of every live process started for this federation.

        This includes the children Flower starts: `flower-superexec`,
        `flwr-serverapp` and the per-message `flwr-clientapp` processes.
        """
        return self._tracker.live_members()

    def start(self) -> None:
        """Start the SuperLink and SuperNodes and wait until all are ready.

        Raises
        ------
        FederationError
            If a component exits or is not ready within `startup_timeout`;
            every started process is stopped before it is raised.
        """
        if self.workdir is not None:
            raise RuntimeError("LocalFederation.start was called twice; create a new LocalFederation")
        started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=self._root_dir))
        self.log_dir.mkdir()
        self.flwr_home.mkdir()
        self._previous_subreaper = set_child_subreaper(True)
        try:
            self._prepare_tls_and_connection()
            deadline = started + self.startup_timeout
            self._start_superlink(deadline)
            self._start_supernodes(deadline)
        except BaseException as exc:
            self.stop(failed=True, interrupted=isinstance(exc, KeyboardInterrupt))
            raise
        self.startup_seconds = time.monotonic() - started
        logger.info(
            "local federation ready in %.1f s: SuperLink %s, %s, TLS %s, workdir %s",
            self.startup_seconds,
            self.superlink_address,
            f"{len(self.supernodes)} SuperNodes"
            if self.simulation is None
            else f"{self.simulation.num_supernodes} simulated SuperNodes",
            "off" if self.insecure else "on",
            self.workdir,
        )

    def run(
        self,
        app_dir: str | os.PathLike[str],
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout: float = 600.0,
        on_log: Callable[[str], None] | None = None,
    ) -> RunResult:
        """Run a Flower app with `flwr run` and wait until it finishes.

        Parameters
        ----------
        app_dir : path-like
            Folder of the Flower app, containing its pyproject.toml.
        run_config : Mapping[str, str | int | float | bool] or None, default None
            Overrides of ``[tool.flwr.app.config]``, passed as ``--run-config``.
        timeout : float, default 600.0
            Seconds the whole run may take, from `flwr run` until its status
            is known.
        on_log : callable or None, default None
            Called with each log line of the run (without colour codes), in
            the calling thread. An exception it raises stops the federation
            and propagates.

        Returns
        -------
        RunResult
            Run id, final status, duration and log file.

        Raises
        ------
        FederationError
            If a component exits, `flwr run` fails, the run does not finish
            with status ``finished:completed``, or `timeout` passes. The
            federation is stopped before it is raised.
        """
        if self._superlink is None or self._stopped:
            raise RuntimeError("LocalFederation.run needs a started federation; use it inside `with`")
        app_path = Path(app_dir).resolve()
        if not (app_path / "pyproject.toml").is_file():
            raise ConfigError(f"Flower app folder {app_path} has no pyproject.toml; pass the app's root folder")
        overrides = format_config(run_config or {})

        try:
            return self._run(app_path, overrides, timeout, on_log)
        except BaseException as exc:
            self.stop(failed=True, interrupted=isinstance(exc, KeyboardInterrupt))
            raise

    def stop(self, *, failed: bool = False, interrupted: bool = False) -> None:
        """Stop every process started for this federation; safe to call twice.

        Parameters
        ----------
        failed : bool, default False
            The caller stops after an error. The working folder with the
            logs is then kept for inspection, without the SuperLink's private
            key unless `keep_files` is set, and its path is logged.
        interrupted : bool, default False
            The caller stops because of an interrupt (Ctrl-C, or SIGTERM that
            the caller turned into KeyboardInterrupt). The working folder is
            kept as after an error, and the log message says interrupt.
        """
        if self._stopped or self.workdir is None:
            return
        self._stopped = True
        try:
            survivors = self._tracker.stop_all(grace=self.stop_timeout)
        except KeyboardInterrupt:
            # A second Ctrl-C must not leave processes behind: skip the grace
            # period, kill what is left, report the kept folder, then let the
            # interrupt through.
            logger.warning("interrupted while stopping; killing the remaining processes")
            survivors = self._tracker.stop_all(grace=0.0)
            self._clean_up(survivors, outcome="an interrupt")
            raise
        finally:
            if self._previous_subreaper is not None:
                set_child_subreaper(self._previous_subreaper)
        outcome = None
        if interrupted:
            outcome = "an interrupt"
        elif failed:
            outcome = "an error"
        self._clean_up(survivors, outcome=outcome)

    def _clean_up(self, survivors: list[int], *, outcome: str | None) -> None:
        """Delete or keep the working folder after a stop and log where the logs are.

        `outcome` is None after a clean stop, else what caused the stop.
        """
        workdir = self._require_workdir()
        if not survivors and outcome is None and not self.keep_files:
            shutil.rmtree(workdir, ignore_errors=True)
            logger.info("local federation stopped")
            return

        if self.keep_files:
            kept = f"files kept in {workdir}"
        else:
            kept = f"logs kept in {self.log_dir}"
            if self._delete_private_keys():
                kept += "; the TLS private key was deleted"
        if survivors:
            logger.error("local federation left PIDs %s running; %s", survivors, kept)
        elif outcome is not None:
            logger.warning("local federation stopped after %s; %s", outcome, kept)
        else:
            logger.info("local federation stopped; %s", kept)

    def _delete_private_keys(self) -> int:
        """Delete the private keys from the working folder, so a kept folder holds no secret; return how many."""
        deleted = 0
        # The folder, not self.certificates, because an interrupt can come
        # after the key file was written and before the attribute was set.
        for keyfile in (self._require_workdir() / "certs").glob("*.key"):
            try:
                keyfile.unlink()
                deleted += 1
            except OSError as exc:
                logger.error("could not delete the TLS private key %s: %s; delete it by hand", keyfile, exc)
        return deleted

    def _prepare_tls_and_connection(self) -> None:
        """Write certificates (unless insecure) and the `flwr` CLI's config.toml."""
        port = _free_ports(1)[0]
        self.superlink_address = f"{LOOPBACK}:{port}"
        lines = [
            "[superlink]",
            f"default = {toml_string(CONNECTION_NAME)}",
            "",
            f"[superlink.{CONNECTION_NAME}]",
            f"address = {toml_string(self.superlink_address)}",
        ]
        if self.insecure:
            logger.warning("TLS is disabled (insecure=True): SuperLink traffic on loopback is plaintext")
            lines.append("insecure = true")
        else:
            certs_dir = self._require_workdir() / "certs"
            certs_dir.mkdir(mode=0o700)
            self.certificates = write_loopback_certificates(certs_dir)
            lines.append(f"root-certificates = {toml_string(str(self.certificates.ca_certfile))}")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _start_superlink(self, deadline: float) -> None:
        """Start `flower-superlink` and wait until its port accepts connections."""
        port = self.superlink_address.rsplit(":", 1)[1]
        argv = ["flower-superlink", "--host", LOOPBACK, "--port", port]
        # The app runs in this environment; otherwise the SuperLink would
        # install its dependencies into a new one with uv for every run.
        argv.append("--disable-runtime-dependency-installation")
        if self.simulation is not None:
            argv.append("--simulation")
        argv += self._superlink_tls_args()
        self._superlink = self._start("flower-superlink", argv, "superlink.log")

        while not _accepts_connections(LOOPBACK, int(port)):
            self._raise_if_exited(self._superlink, "while starting")
            self._raise_if_late(deadline, self._superlink, f"to accept connections on {self.superlink_address}")
            time.sleep(_POLL_INTERVAL)

    def _start_supernodes(self, deadline: float) -> None:
        """Start one `flower-supernode` per device and wait until all registered."""
        runtime_ports = _free_ports(len(self.supernodes))
        for spec, runtime_port in zip(self.supernodes, runtime_ports):
            argv = ["flower-supernode", "--superlink", self.superlink_address]
            argv += ["--host", LOOPBACK, "--port", str(runtime_port)]
            argv += ["--node-config", self._node_config_args[spec.name]]
            argv += ["--insecure"] if self.insecure else ["--root-certificates", str(self.certificates.ca_certfile)]
            log_name = "supernode-" + re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name) + ".log"
            self._supernode_processes[spec.name] = self._start(f"flower-supernode for {spec.name}", argv, log_name)

        waiting = dict(self._supernode_processes)
        while waiting:
            for name, process in list(waiting.items()):
                match = _SUPERNODE_READY.search(process.tail(lines=200))
                if match:
                    self.node_ids[name] = int(match.group(1))
                    logger.info("SuperNode %s registered as node %s", name, match.group(1))
                    del waiting[name]
                    continue
                self._raise_if_exited(process, "before registering with the SuperLink")
                self._raise_if_late(deadline, process, f"to register with the SuperLink at {self.superlink_address}")
            self._raise_if_exited(self._superlink, "while SuperNodes were registering")
            self._tracker.refresh()
            time.sleep(_POLL_INTERVAL)

    def _run(
        self,
        app_path: Path,
        overrides: str,
        timeout: float,
        on_log: Callable[[str], None] | None,
    ) -> RunResult:
        """Start `flwr run`, follow its log and return the run's outcome."""
        started = time.monotonic()
        deadline = started + timeout
        run_number = sum(1 for p in self._tracker.processes if p.name.startswith("flwr run")) + 1
        argv = ["flwr", "run", str(app_path), CONNECTION_NAME, "--stream"]
        if overrides:
            argv += ["--run-config", overrides]
        if self.simulation is not None:
            argv += ["--federation-config", format_config(self.simulation.federation_config())]
        process = self._start(f"flwr run #{run_number}", argv, f"run-{run_number}.log")
        logger.info("flwr run #%d started for %s", run_number, app_path)

        follower = _LogFollower(process.log_path, on_log)
        while process.exit_code() is None:
            follower.poll()
            self._check_components_during_run()
            self._raise_if_late(deadline, process, "to finish the run")
            self._tracker.refresh()
            time.sleep(_POLL_INTERVAL)
        follower.poll(final=True)
        seconds = time.monotonic() - started

        code = process.exit_code()
        if code != 0:
            raise FederationError(
                f"{process.name} {describe_exit(code)}; last log lines:\n{process.tail()}",
                component=process.name,
            )
        run_id = follower.run_id
        if run_id is None:
            raise FederationError(
                f"{process.name} exited without starting a run; last log lines:\n{process.tail()}",
                component=process.name,
            )
        status = self._run_status(run_id, deadline)
        result = RunResult(run_id, status, seconds, process.log_path, tuple(sorted(self._lost)))
        if status != "finished:completed":
            raise FederationError(
                f"run {run_id} ended with status {status!r}; last log lines:\n{process.tail()}",
                component="flwr-serverapp",
            )
        logger.info("run %d finished in %.1f s", run_id, seconds)
        return result

    def _check_components_during_run(self) -> None:
        """Raise if the SuperLink exited, and handle SuperNodes that exited."""
        self._raise_if_exited(self._superlink, "during the run")
        for name, process in self._supernode_processes.items():
            if name in self._lost or process.exit_code() is None:
                continue
            if self.stop_on_supernode_exit:
                self._raise_if_exited(process, "during the run")
            self._lost.add(name)
            logger.warning(
                "flower-supernode for %s %s during the run; the run goes on without it",
                name,
                describe_exit(process.exit_code()),
            )

    def _run_status(self, run_id: int, deadline: float) -> str:
        """Ask the SuperLink for a run's status with `flwr ls --format json`."""
        argv = ["flwr", "ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"]
        timeout = max(1.0, min(_CLI_TIMEOUT, deadline - time.monotonic()))
        try:
            completed = subprocess.run(
                argv,
                env=self._child_env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                # A session of its own keeps Ctrl-C in the terminal from
                # reaching it; the timeout above bounds the wait.
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise FederationError(
                f"flwr ls did not return the status of run {run_id} within {timeout:.0f} s",
                component="flwr ls",
            ) from exc
        output = completed.stdout.decode("utf-8", errors="replace")
        try:
            runs = json.loads(output[output.index("{") :])["runs"]
            return str(runs[0]["status"])
        except (ValueError, KeyError, IndexError) as exc:
            raise FederationError(
                f"flwr ls returned no status for run {run_id} (exit code {completed.returncode}); "
                f"output: {strip_ansi(output + completed.stderr.decode('utf-8', errors='replace'))[-2000:]}",
                component="flwr ls",
            ) from exc

    def _start(self, name: str, argv: list[str], log_name: str) -> ManagedProcess:
        """Start one component in its own session and track it."""
        process = ManagedProcess(
            name,
            argv,
            log_path=self.log_dir / log_name,
            env=self._child_env(),
            cwd=self.workdir,
        )
        process.start()
        self._tracker.add(process)
        return process

    def _child_env(self) -> dict[str, str]:
        """Build the environment of every Flower process."""
        env = dict(os.environ)
        env.update(self._extra_env)
        # Flower's programs start each other by name (flower-superexec,
        # flwr-serverapp, flwr-clientapp), so the folder of this Python's
        # scripts goes first on PATH even when no virtualenv is activated.
        scripts = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
        env["FLWR_HOME"] = str(self.flwr_home)
        # Telemetry and the update check would send requests to flower.ai.
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        # Unbuffered output, so readiness lines reach the log files at once.
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _superlink_tls_args(self) -> list[str]:
        """Return the SuperLink's TLS options, or ``--insecure``."""
        if self.insecure:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.certificates.ca_certfile),
            "--ssl-certfile",
            str(self.certificates.certfile),
            "--ssl-keyfile",
            str(self.certificates.keyfile),
        ]

    def _raise_if_exited(self, process: ManagedProcess, when: str) -> None:
        """Raise `FederationError` naming `process` if it has exited."""
        code = process.exit_code()
        if code is not None:
            raise FederationError(
                f"{process.name} {describe_exit(code)} {when}; last log lines:\n{process.tail()}",
                component=process.name,
            )

    def _raise_if_late(self, deadline: float, process: ManagedProcess, what: str) -> None:
        """Raise `FederationError` naming `process` once `deadline` has passed.

        `what` completes the message "timed out waiting for PROCESS ...".
        """
        if time.monotonic() > deadline:
            raise FederationError(
                f"timed out waiting for {process.name} {what}; last log lines:\n{process.tail()}",
                component=process.name,
            )

    def _require_workdir(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("LocalFederation has not been started")
        return self.workdir


class _LogFollower:
    """Read the new lines of a growing log file and pass them to a callback."""

    def __init__(self, path: Path, callback: Callable[[str], None] | None) -> None:
        self._path = path
        self._callback = callback
        self._offset = 0
        # Incremental, so a UTF-8 character split across two reads survives.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self.run_id: int | None = None

    def poll(self, *, final: bool = False) -> None:
        """Read what was appended since the last call; `final` flushes a last partial line."""
        try:
            with self._path.open("rb") as log_file:
                log_file.seek(self._offset)
                data = log_file.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + self._decoder.decode(data, final=final)).split("\n")
        self._partial = "" if final else lines.pop()
        for raw_line in lines:
            line = strip_ansi(raw_line).rstrip("\r")
            if final and not line:
                continue
            match = _RUN_STARTED.search(line)
            if match and self.run_id is None:
                self.run_id = int(match.group(1))
            if self._callback is not None:
                self._callback(line)


def _free_ports(count: int) -> list[int]:
    """Return `count` distinct loopback ports that are free right now.

    All sockets stay bound until every port is chosen, so the ports differ.
    """
    # NOTE: another program may take a port between this check and the
    # component's bind; the component then exits and start() reports it.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _accepts_connections(host: str, port: int) -> bool:
    """Return True if a TCP connection to `host:port` succeeds within 0.5 s."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
