"""Measure what a 2-stage pipeline gains over one process on a compute-bound model.

Prints one JSON object. Three runs train the same MLP on the same samples:

- ``pipeline``: 2 stage processes, 1 torch thread each, 1F1B, M micro-batches;
- ``single_1thread``: the unsplit model in 1 process with 1 thread;
- ``single_2threads``: the unsplit model in 1 process with 2 threads, the
  honest comparison on a 2-core machine.

Throughput counts only steps after the warm-up, so process start-up is not
measured. The ideal pipeline bound is ``S * M / (M + S - 1)``.

Usage::

    python benchmarks/pipeline_speedup.py [--steps 6] [--batch-size 8192] [--microbatches 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

from homesplit.job import PipelineJob, build_split
from homesplit.local import run_local_pipeline
from homesplit.partition import even_cuts

WIDTH = 1024
FEATURES = 1024


def make_job(steps: int, batch_size: int, microbatches: int, cuts: list[str]) -> PipelineJob:
    return PipelineJob(
        model="homesplit.models:mlp",
        model_kwargs={"in_features": FEATURES, "hidden": WIDTH, "depth": 8},
        example_shape=[1, FEATURES],
        cuts=cuts,
        data="homesplit.datasets:random_classification",
        data_kwargs={"steps": steps, "batch_size": batch_size, "features": FEATURES},
        schedule="1f1b",
        num_microbatches=microbatches,
        optimizer={"name": "Adam", "lr": 1e-4},
    )


def run_single(job: PipelineJob, threads: int, warmup: int) -> dict:
    """Train unsplit in this process; return samples/s after the warm-up and peak RSS."""
    from homesplit.job import build_loss, build_optimizer, load_callable

    torch.set_num_threads(threads)
    model = job.build_model()
    optimizer = build_optimizer(job.optimizer, model.parameters())
    loss_fn = build_loss(job.loss)
    samples = 0
    seconds = 0.0
    for index, (x, y) in enumerate(load_callable(job.data)(**job.data_kwargs)):
        start = time.perf_counter()
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            seconds += time.perf_counter() - start
            samples += x.shape[0]
    return {
        "samples_per_second": samples / seconds,
        "threads": threads,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def single_in_subprocess(args: argparse.Namespace, threads: int) -> dict:
    command = [sys.executable, __file__, "--single", str(threads), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--microbatches", str(args.microbatches), "--warmup", str(args.warmup)]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900).stdout
    return json.loads(output)


def segment_memory(job: PipelineJob) -> list[dict]:
    """Parameter and Adam state bytes per stage (Adam keeps two moments per parameter)."""
    split = build_split(job, device="meta")
    rows = []
    for k, segment in enumerate(split.segments):
        parameter_bytes = sum(p.numel() * p.element_size() for p in segment.parameters())
        rows.append({"stage": k, "parameter_bytes": parameter_bytes, "optimizer_state_bytes": 2 * parameter_bytes})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="mini-batches per run (default: 6)")
    parser.add_argument("--warmup", type=int, default=2, help="mini-batches left out of the timing (default: 2)")
    parser.add_argument("--batch-size", type=int, default=8192, help="samples per mini-batch (default: 8192)")
    parser.add_argument("--microbatches", type=int, default=32, help="micro-batches per mini-batch (default: 32)")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    probe = make_job(args.steps, args.batch_size, args.microbatches, [])
    if args.single:
        print(json.dumps(run_single(probe, args.single, args.warmup)))
        return

    model = probe.build_model(device="meta")
    cuts = even_cuts(model, 2, example_inputs=probe.example_inputs())
    job = make_job(args.steps, args.batch_size, args.microbatches, cuts)
    torch.manual_seed(0)
    initial = job.build_model().state_dict()
    with tempfile.TemporaryDirectory() as workdir:
        run = run_local_pipeline(job, initial, workdir=workdir, threads=1)
    lead = run.reports[0]["steps"][args.warmup :]
    pipeline_rate = sum(s["batch_size"] for s in lead) / sum(s["seconds"] for s in lead)

    one = single_in_subprocess(args, 1)
    two = single_in_subprocess(args, 2)
    stages, m = 2, args.microbatches
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "benchmark": "pipeline_speedup",
                "model": f"mlp in={FEATURES} hidden={WIDTH} depth=8 ({whole} parameter bytes)",
                "cuts": cuts,
                "batch_size": args.batch_size,
                "microbatches": m,
                "timed_steps": args.steps - args.warmup,
                "pipeline_samples_per_second": pipeline_rate,
                "single_1thread_samples_per_second": one["samples_per_second"],
                "single_2threads_samples_per_second": two["samples_per_second"],
                "speedup_vs_1thread": pipeline_rate / one["samples_per_second"],
                "speedup_vs_2threads": pipeline_rate / two["samples_per_second"],
                "ideal_bound": stages * m / (m + stages - 1),
                "stage_peak_rss_bytes": [r["peak_rss_bytes"] for r in run.reports],
                "single_1thread_peak_rss_bytes": one["peak_rss_bytes"],
                "stage_memory": segment_memory(job),
                "whole_model_parameter_bytes": whole,
                "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
