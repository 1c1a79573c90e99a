"""Step time of sample-level DP-SGD across a 2-stage pipeline against single-process Opacus.

Prints one JSON document. Both sides train the same unsplit MLP on the same
mini-batches with per-sample clipping and noise:

- ``opacus``: one process, Opacus 1.6 GradSampleModule and DPOptimizer.
- ``pipeline``: two stage processes on loopback TCP, each with one torch
  thread, homesplit's whole-model clipping (per-sample norms exchanged over
  the link) and noise on each segment.

The figure is the median step time after warm-up steps. For the pipeline it is
the time that stage 0, the data owner, measures from sending the step to its
optimizer step. ``ratio`` is pipeline / opacus, and the target is 1.5 or
less. Opacus runs with one thread too, so each side uses one core per process.

Run::

    python benchmarks/dp_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from homesplit.job import PipelineJob, build_loss, build_optimizer, load_callable
from homesplit.local import run_local_pipeline
from homesplit.models import mlp
from homesplit.partition import even_cuts

MODEL_KWARGS = {"in_features": 256, "hidden": 512, "depth": 4, "classes": 10}
PRIVACY = {"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.01, "expected_batch_size": 64}


def make_job(*, steps: int, batch_size: int, microbatches: int, schedule: str) -> PipelineJob:
    cuts = even_cuts(mlp(**MODEL_KWARGS), 2, example_inputs=(torch.zeros(1, MODEL_KWARGS["in_features"]),))
    return PipelineJob(
        model="homesplit.models:mlp", model_kwargs=MODEL_KWARGS, example_shape=[1, MODEL_KWARGS["in_features"]],
        cuts=cuts, data="homesplit.datasets:random_classification",
        data_kwargs={"steps": steps, "batch_size": batch_size, "features": MODEL_KWARGS["in_features"], "seed": 0},
        schedule=schedule, num_microbatches=microbatches, optimizer={"name": "SGD", "lr": 0.05}, privacy=PRIVACY,
    )  # fmt: skip


def opacus_step_seconds(job: PipelineJob, initial: dict[str, torch.Tensor]) -> list[float]:
    """Train `job` unsplit with Opacus in this process and return each step's seconds."""
    torch.set_num_threads(1)
    model = job.build_model()
    model.load_state_dict(initial)
    module = GradSampleModule(model, loss_reduction="mean")
    optimizer = DPOptimizer(
        build_optimizer(job.optimizer, module.parameters()),
        noise_multiplier=PRIVACY["noise_multiplier"],
        max_grad_norm=PRIVACY["max_grad_norm"],
        expected_batch_size=PRIVACY["expected_batch_size"],
    )
    loss_fn = build_loss(job.loss)
    seconds = []
    for inputs, targets in load_callable(job.data)(**job.data_kwargs):
        start = time.perf_counter()
        loss_fn(module(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def pipeline_step_seconds(job: PipelineJob, initial: dict[str, torch.Tensor], workdir: str) -> list[float]:
    """Train `job` with two stage processes and return stage 0's seconds per step."""
    run = run_local_pipeline(job, initial, workdir=workdir, threads=1)
    return [step["seconds"] for step in run.reports[0]["steps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 measured steps instead of 40")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per mini-batch (default: 64)")
    args = parser.parse_args()
    warmup, measured = 5, 10 if args.quick else 40

    torch.manual_seed(0)
    initial = mlp(**MODEL_KWARGS).state_dict()
    opacus_job = make_job(steps=warmup + measured, batch_size=args.batch_size, microbatches=1, schedule="gpipe")
    opacus_median = statistics.median(opacus_step_seconds(opacus_job, initial)[warmup:])

    results = []
    with tempfile.TemporaryDirectory(prefix="homesplit-dp-overhead-") as work:
        for schedule, microbatches in [("1f1b", 1), ("1f1b", 2), ("1f1b", 4), ("gpipe", 4)]:
            job = make_job(steps=warmup + measured, batch_size=args.batch_size, microbatches=microbatches, schedule=schedule)
            seconds = pipeline_step_seconds(job, initial, os.path.join(work, f"{schedule}-{microbatches}"))
            median = statistics.median(seconds[warmup:])
            results.append(
                {"schedule": schedule, "microbatches": microbatches, "step_seconds": median, "ratio": median / opacus_median}
            )

    best = min(results, key=lambda r: r["ratio"])
    print(
        json.dumps(
            {
                "model": {"name": "mlp", **MODEL_KWARGS},
                "batch_size": args.batch_size,
                "measured_steps": measured,
                "opacus_step_seconds": opacus_median,
                "pipeline": results,
                "best_ratio": best["ratio"],
                "target_ratio": 1.5,
                "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
