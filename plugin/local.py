"""Run a pipeline on this machine, one OS process per stage.

This is how tests and benchmarks stand in for a household: each stage is a
`homesplit.worker` process, and the stages talk over real sockets on
loopback. The parent opens every listening socket itself and hands it to the
child by file descriptor, so ports are chosen without a race. A caller that
runs the stages in network namespaces gives the listen addresses instead.

`train_reference` trains the same job unsplit in this process; it is the
independent reference that the pipeline must match.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from homesplit.errors import HomesplitError
from homesplit.job import PipelineJob, build_loss, build_optimizer, build_split, load_callable
from homesplit.tensorfile import load_tensors, save_tensors
from homesplit.transport import open_listener

__all__ = ["PipelineRunError", "LocalRun", "run_local_pipeline", "run_local_pipelines", "train_reference", "split_state"]

logger = logging.getLogger(__name__)


class PipelineRunError(HomesplitError):
    """One or more stage processes failed; `reports` has each stage's error."""

    def __init__(self, message: str, reports: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.reports = reports


@dataclass
class LocalRun:
    """Outcome of `run_local_pipeline`.

    Attributes
    ----------
    state : dict of str to Tensor
        Union of the final segment weights, keyed as in the full model.
    reports : list of dict
        Per stage: its JSON report (steps, bytes, seconds, peak RSS).
    seconds : float
        Wall time from the first process start to the last exit.
    """

    state: dict[str, torch.Tensor]
    reports: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def split_state(job: PipelineJob, state: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Cut a full state dict into per-stage state dicts by segment parameter names."""
    split = build_split(job, device="meta")
    return [{name: state[name] for name in split.parameter_names(k)} for k in range(split.num_stages)]


def run_local_pipeline(
    job: PipelineJob,
    initial_state: Mapping[str, torch.Tensor],
    *,
    workdir: str | os.PathLike,
    **options: Any,
) -> LocalRun:
    """Train `job` with one process per stage on loopback and return the result.

    Parameters
    ----------
    job : PipelineJob
        The job; ``job.num_stages`` processes are started.
    initial_state : mapping of str to Tensor
        Full-model weights; each stage gets only its segment's share.
    workdir : path
        Folder for the job file, weight files, logs and reports.
    **options
        As for `run_local_pipelines`.

    Raises
    ------
    PipelineRunError
        If any stage fails or the deadline passes; the message names each
        failed stage and its error.
    """
    return _launch([job], [initial_state], Path(workdir), single=True, **options)[0]


def run_local_pipelines(
    jobs: Sequence[PipelineJob],
    initial_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    workdir: str | os.PathLike,
    **options: Any,
) -> list[LocalRun]:
    """Train several jobs with the same stage count, one after another, in one set of stage processes.

    Each stage process runs every job in turn, so process start-up is paid
    once. Job ``i`` runs as round ``i``, so links of different jobs never mix.

    Parameters
    ----------
    jobs : sequence of PipelineJob
        Jobs with equal ``num_stages``.
    initial_states : sequence of mappings
        Full-model weights for each job.
    workdir : path
        Folder for job files, weights, logs and reports.
    transport : {"tcp", "tls"}, default "tcp"
        Link transport; "tls" needs one device bundle folder per stage in `bundles`.
    bundles : sequence of str, optional
        Device bundle folder per stage, for TLS.
    threads : int, default 1
        torch threads per stage process.
    deadline : float, default 600.0
        Seconds after which every stage still running is killed.
    peer_silence, connect_timeout : float
        Link deadlines passed to every stage, in seconds.
    extra_env : mapping, optional
        Extra environment variables for the stage processes.
    started : callable, optional
        Called with the list of `subprocess.Popen` objects once all started,
        so a caller can inspect or signal them (tests kill one this way).
    stage_prefixes : sequence of sequence of str, optional
        Per stage, a command that runs the stage's Python command, for example
        ``["ip", "netns", "exec", NAME]`` to run it in a network namespace.
        The command must exec its argument, so that the process id stays the
        stage's. None runs every stage directly.
    listen_addresses : sequence of str, optional
        ``HOST:PORT`` that stage ``k + 1`` listens on and stage ``k`` dials,
        one per cut. None lets this process open each listener on 127.0.0.1
        with a free port and hand it over by file descriptor. Give addresses
        when the stages run in other network namespaces, because a socket
        stays in the namespace of the process that created it.
    return_freed_memory : bool, default False
        Run the stages with `homesplit.allocator.pin_mmap_threshold`, so that
        their peak RSS follows their live tensors (the planner's memory
        model) at the cost of page faults on every large allocation.

    Raises
    ------
    PipelineRunError
        If any stage fails in any job.
    """
    if len({job.num_stages for job in jobs}) != 1:
        raise HomesplitError(f"jobs have stage counts {sorted({j.num_stages for j in jobs})}; run_local_pipelines needs one")
    numbered = [PipelineJob.from_json(job.to_json()) for job in jobs]
    for index, job in enumerate(numbered):
        job.round = index
    return _launch(numbered, initial_states, Path(workdir), single=False, **options)


def _launch(
    jobs: Sequence[PipelineJob],
    initial_states: Sequence[Mapping[str, torch.Tensor]],
    work: Path,
    *,
    single: bool,
    transport: str = "tcp",
    bundles: Sequence[str] | None = None,
    threads: int = 1,
    deadline: float = 600.0,
    peer_silence: float = 15.0,
    connect_timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
    started: Any = None,
    stage_prefixes: Sequence[Sequence[str]] | None = None,
    listen_addresses: Sequence[str] | None = None,
    return_freed_memory: bool = False,
) -> list[LocalRun]:
    work.mkdir(parents=True, exist_ok=True)
    num_stages = jobs[0].num_stages
    job_path = work / "job.json"
    if single:
        job_path.write_text(jobs[0].to_json())
    else:
        job_path.write_text("[" + ",".join(job.to_json() for job in jobs) + "]")
    for index, (job, state) in enumerate(zip(jobs, initial_states)):
        for stage, share in enumerate(split_state(job, state)):
            suffix = "" if single else f"-{index}"
            save_tensors(work / f"stage{stage}.init{suffix}.tensors", share)
    if transport == "tls" and (not bundles or len(bundles) != num_stages):
        raise HomesplitError(f"transport 'tls' needs {num_stages} bundle folders, one per stage; got {bundles}")

    if stage_prefixes is not None and len(stage_prefixes) != num_stages:
        raise HomesplitError(f"stage_prefixes has {len(stage_prefixes)} entries; give one per stage ({num_stages})")
    if listen_addresses is not None and len(listen_addresses) != num_stages - 1:
        raise HomesplitError(f"listen_addresses has {len(listen_addresses)} entries; give one per cut ({num_stages - 1})")

    if listen_addresses is None:
        listeners = [open_listener("127.0.0.1:0") for _ in range(num_stages - 1)]
        addresses = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in listeners]
    else:
        listeners, addresses = [], list(listen_addresses)
    env = dict(os.environ)
    env.update(extra_env or {})
    processes: list[subprocess.Popen] = []
    start = time.perf_counter()
    try:
        for stage in range(num_stages):
            prefix = list(stage_prefixes[stage]) if stage_prefixes is not None else []
            command = [
                *prefix, sys.executable, "-m", "homesplit.worker",
                "--job", str(job_path), "--stage", str(stage), "--weights", str(work / f"stage{stage}.init"),
                "--out", str(work / f"stage{stage}"), "--transport", transport, "--threads", str(threads),
                "--peer-silence", str(peer_silence), "--connect-timeout", str(connect_timeout),
            ]  # fmt: skip
            pass_fds: tuple[int, ...] = ()
            if stage > 0 and listeners:
                fd = listeners[stage - 1].fileno()
                command += ["--listen", f"fd:{fd}"]
                pass_fds = (fd,)
            elif stage > 0:
                command += ["--listen", addresses[stage - 1]]
            if stage < num_stages - 1:
                command += ["--next", addresses[stage]]
            if transport == "tls":
                command += ["--bundle", str(bundles[stage])]
            if return_freed_memory:
                command.append("--return-freed-memory")
            with open(work / f"stage{stage}.log", "wb") as log:
                processes.append(
                    subprocess.Popen(
                        command, stdout=log, stderr=subprocess.STDOUT, pass_fds=pass_fds, env=env, start_new_session=True
                    )
                )
        for sock in listeners:
            sock.close()
        if started is not None:
            started(processes)
        _wait_all(processes, deadline=start + deadline)
    finally:
        for sock in listeners:
            sock.close()
        _stop(processes)
    seconds = time.perf_counter() - start

    runs = []
    for index in range(len(jobs)):
        suffix = "" if single else f"-{index}"
        reports = [_read_report(work, f"stage{stage}{suffix}", stage, proc) for stage, proc in enumerate(processes)]
        failed = [r for r in reports if r.get("error")]
        if failed:
            summary = "; ".join(f"stage {r['stage']}: {r['error']}" for r in failed)
            raise PipelineRunError(f"job {index}: {len(failed)} of {num_stages} stages failed: {summary}", reports)
        state: dict[str, torch.Tensor] = {}
        for stage in range(num_stages):
            state.update(load_tensors(work / f"stage{stage}{suffix}.tensors"))
        runs.append(LocalRun(state=state, reports=reports, seconds=seconds))
    return runs


def _wait_all(processes: list[subprocess.Popen], *, deadline: float) -> None:
    pending = list(processes)
    while pending:
        if time.perf_counter() > deadline:
            logger.error("Pipeline deadline passed; killing %d stage processes", len(pending))
            return
        pending = [p for p in pending if p.poll() is None]
        time.sleep(0.05)


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop every process still running: SIGTERM, a grace period, then SIGKILL."""
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _read_report(work: Path, name: str, stage: int, proc: subprocess.Popen) -> dict[str, Any]:
    path = work / f"{name}.json"
    if path.exists():
        report = json.loads(path.read_text())
    else:
        tail = (work / f"stage{stage}.log").read_text(errors="replace").strip().splitlines()[-3:]
        report = {
            "stage": stage,
            "error": f"process {proc.pid} exited with code {proc.returncode} without a report; log: {' | '.join(tail)}",
        }
    report["returncode"] = proc.returncode
    return report


def train_reference(
    job: PipelineJob, initial_state: Mapping[str, torch.Tensor], *, threads: int | None = None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train `job` unsplit in this process: the reference the pipeline must equal.

    Each mini-batch is one forward and backward pass of the whole model with
    the loss averaged over the mini-batch, then one optimizer step. Empty
    mini-batches are skipped, as the pipeline skips them.

    Returns
    -------
    tuple of (dict, list of float)
        Final weights and the loss of every non-empty mini-batch.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    model = job.build_model(device="cpu")
    model.load_state_dict(dict(initial_state), strict=True)
    model.train()
    optimizer = build_optimizer(job.optimizer, model.parameters())
    loss_fn = build_loss(job.loss)
    losses = []
    for index, (inputs, targets) in enumerate(load_callable(job.data)(**job.data_kwargs)):
        if job.max_steps is not None and index >= job.max_steps:
            break
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if args[0].shape[0] == 0:
            continue
        loss = loss_fn(model(*args), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses
