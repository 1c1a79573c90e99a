"""Measure what the stage runtime costs per micro-batch, apart from the model.

A stage process does more per micro-batch than the layers' forward and
backward passes: it splits the mini-batch, frames and sends tensors, wakes its
link threads and runs the schedule's Python loop. The layer profile times the
units in one process and misses all of it, although on a slow device it runs
at that device's speed too.

`measure_stage_overhead` runs a real two-stage pipeline (`run_local_pipelines`,
one process per stage, TCP on loopback) of a model too small to cost anything
worth counting. It trains the same mini-batches with two micro-batch counts
``M1 < M2``, in alternating rounds so that a change of load on the machine
affects both counts alike. The cost model's step is ``traversal + (M - 1) *
bottleneck``, and in this pipeline the bottleneck period is the runtime's own
work, so the median step of stage 0 grows by that period per extra
micro-batch:

    (step(M2) - step(M1)) / (M2 - M1).

This period is the figure the cost model adds to every stage per micro-batch.
It includes the forward and backward pass of two 4-wide Linear layers and the
loopback round trip of each frame, both small beside the runtime's own work.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from homesplit.errors import ConfigError
from homesplit.job import PipelineJob
from homesplit.local import run_local_pipelines

__all__ = ["measure_stage_overhead"]

logger = logging.getLogger(__name__)

# The smallest model the runtime can split in two: Linear(4, 4), ReLU, Linear(4, 2).
_MODEL = "homesplit.models:mlp"
_MODEL_KWARGS = {"in_features": 4, "hidden": 4, "depth": 1, "classes": 2}
_CUT = "1"


def measure_stage_overhead(
    *,
    microbatch_counts: Sequence[int] = (2, 32),
    steps: int = 12,
    warmup_steps: int = 2,
    rounds: int = 3,
    threads: int = 1,
    workdir: str | Path | None = None,
    deadline: float = 300.0,
) -> float:
    """Measure the stage runtime's seconds per micro-batch and stage on this machine.

    Parameters
    ----------
    microbatch_counts : sequence of two int, default (2, 32)
        The two micro-batch counts ``M1 < M2`` to fit the slope over. The
        mini-batch has ``M2`` samples, so every count divides it.
    steps : int, default 12
        Mini-batches per count and round, `warmup_steps` of them not timed.
    warmup_steps : int, default 2
        Leading mini-batches of each round left out of the median.
    rounds : int, default 3
        Rounds per count; the counts take turns, and the median is over the
        timed steps of all rounds of a count.
    threads : int, default 1
        torch threads per stage process; use what the profiled stages use.
        NOTE: with 2 threads on a loaded 2-core machine (load average 12),
        every step took about 0.2 s whatever the micro-batch count, and the
        fit came out negative. One thread gave a positive fit there.
    workdir : str or Path or None, default None
        Folder for the stage processes' files; None uses a temporary folder.
    deadline : float, default 300.0
        Seconds after which the stage processes are killed.

    Returns
    -------
    float
        Seconds per micro-batch and stage, at least 0.0. A negative fit, which
        load on the machine can cause, logs a warning and returns 0.0.

    Raises
    ------
    ConfigError
        If the counts are not two increasing positive integers, or `steps`
        leaves no timed mini-batch.
    PipelineRunError
        If a stage process fails.
    """
    counts = list(microbatch_counts)
    if len(counts) != 2 or not all(isinstance(c, int) and c >= 1 for c in counts) or counts[0] >= counts[1]:
        raise ConfigError(f"microbatch_counts={microbatch_counts!r} must be two increasing positive integers")
    if warmup_steps < 0 or steps <= warmup_steps:
        raise ConfigError(f"steps={steps} must exceed warmup_steps={warmup_steps}, which must not be negative")
    if rounds < 1:
        raise ConfigError(f"rounds={rounds} must be at least 1")

    batch_size = counts[1]
    jobs = [
        PipelineJob(
            model=_MODEL,
            model_kwargs=dict(_MODEL_KWARGS),
            example_shape=[1, _MODEL_KWARGS["in_features"]],
            cuts=[_CUT],
            data="homesplit.datasets:random_classification",
            data_kwargs={"steps": steps, "batch_size": batch_size, "features": 4, "classes": 2},
            num_microbatches=count,
            schedule="1f1b",
        )
        for _ in range(rounds)
        for count in counts
    ]
    torch.manual_seed(0)
    state = jobs[0].build_model(device="cpu").state_dict()

    with tempfile.TemporaryDirectory(prefix="homesplit-overhead-") as scratch:
        runs = run_local_pipelines(
            jobs, [state] * len(jobs), workdir=Path(workdir or scratch), threads=threads, deadline=deadline
        )
    timed: list[list[float]] = [[], []]
    for index, run in enumerate(runs):
        timed[index % 2] += [step["seconds"] for step in run.reports[0]["steps"][warmup_steps:]]
    medians = [statistics.median(seconds) for seconds in timed]
    slot = (medians[1] - medians[0]) / (counts[1] - counts[0])
    if slot < 0:
        logger.warning(
            "stage overhead fit is negative (%.3g s per micro-batch from steps of %.4g s and %.4g s at %d and %d "
            "micro-batches), probably from load on the machine; using 0.0",
            slot, medians[0], medians[1], counts[0], counts[1],
        )
        return 0.0
    logger.info(
        "stage overhead %.3g ms per micro-batch and stage (steps of %.4g s and %.4g s at %d and %d micro-batches)",
        slot * 1e3, medians[0], medians[1], counts[0], counts[1],
    )
    return slot
