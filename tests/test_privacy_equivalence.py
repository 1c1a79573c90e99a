"""With noise off, DP-SGD across the pipeline equals Opacus's DPOptimizer on the unsplit model.

Every case runs each stage in its own OS process over loopback TCP, clips
per-sample gradients (whole-model norms exchanged between the stages) and
compares every parameter after several SGD-with-momentum steps with Opacus
1.6 (GradSampleModule and DPOptimizer, loss_reduction="mean") on the unsplit
model. Clipping bounds are small, so most samples are clipped, and the data
includes empty mini-batches, which Opacus turns into a noise-only step.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from homesplit.job import PipelineJob, build_loss, build_optimizer, build_split, load_callable
from homesplit.local import run_local_pipelines
from homesplit.models import mlp
from homesplit.partition import even_cuts
from homesplit.privacy.settings import stage_bounds

MAX_GRAD_NORM = 0.3
EXPECTED_BATCH_SIZE = 6.4
OPTIMIZER = {"name": "SGD", "lr": 0.5, "momentum": 0.9}
FIXED_SIZES = [13, 0, 1, 3, 9, 0, 2, 8]


def privacy(**overrides) -> dict:
    settings = {
        "mode": "sample", "noise_multiplier": 0.0, "max_grad_norm": MAX_GRAD_NORM,
        "sample_rate": 0.1, "expected_batch_size": EXPECTED_BATCH_SIZE,
    }  # fmt: skip
    settings.update(overrides)
    return settings


def build_jobs(stages: int) -> list[PipelineJob]:
    cuts = even_cuts(mlp(), stages, example_inputs=(torch.zeros(1, 32),))
    jobs = []
    for schedule, microbatches in itertools.product(["gpipe", "1f1b"], [1, 2, 3, 5]):
        jobs.append(
            PipelineJob(
                model="homesplit.models:mlp", example_shape=[1, 32], cuts=cuts,
                data="homesplit.privacy.sampling:poisson_classification",
                data_kwargs={"dataset_size": 64, "sample_rate": 0.1, "steps": 5, "seed": microbatches},
                schedule=schedule, num_microbatches=microbatches, optimizer=OPTIMIZER, privacy=privacy(),
            )
        )  # fmt: skip
    # Sizes as Poisson sampling gives them, with empty steps and fewer samples than micro-batches.
    jobs.append(
        PipelineJob(
            model="homesplit.models:mlp", example_shape=[1, 32], cuts=cuts,
            data="homesplit.datasets:random_classification", data_kwargs={"sizes": FIXED_SIZES, "seed": 3},
            schedule="1f1b", num_microbatches=4, optimizer=OPTIMIZER, privacy=privacy(),
        )
    )  # fmt: skip
    return jobs


def opacus_reference(job: PipelineJob, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Train `job` unsplit with Opacus's DPOptimizer in this process."""
    model = job.build_model()
    model.load_state_dict(initial)
    module = GradSampleModule(model, loss_reduction="mean")
    optimizer = DPOptimizer(
        build_optimizer(job.optimizer, module.parameters()),
        noise_multiplier=job.privacy["noise_multiplier"],
        max_grad_norm=job.privacy["max_grad_norm"],
        expected_batch_size=job.privacy["expected_batch_size"],
        loss_reduction="mean",
    )
    loss_fn = build_loss(job.loss)
    for inputs, targets in load_callable(job.data)(**job.data_kwargs):
        loss = loss_fn(module(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def describe(job: PipelineJob) -> str:
    return f"{job.num_stages} stages {job.schedule} M={job.num_microbatches} data={job.data_kwargs}"


def initial_states(jobs: list[PipelineJob]) -> list[dict[str, torch.Tensor]]:
    states = []
    for index, job in enumerate(jobs):
        torch.manual_seed(index)
        states.append(job.build_model().state_dict())
    return states


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_clipped_pipeline_matches_opacus(stages, tmp_path):
    jobs = build_jobs(stages)
    initial = initial_states(jobs)

    runs = run_local_pipelines(jobs, initial, workdir=tmp_path)

    for job, init, run in zip(jobs, initial, runs):
        reference = opacus_reference(job, init)
        assert set(run.state) == set(reference), describe(job)
        moved = max(float((reference[k] - init[k]).abs().max()) for k in reference)
        assert moved > 1e-3, f"reference did not train: {describe(job)}"
        for key, expected in reference.items():
            torch.testing.assert_close(run.state[key], expected, rtol=0, atol=1e-5, msg=lambda m: f"{key} {describe(job)}: {m}")


@pytest.mark.slow
def test_empty_minibatch_is_a_dp_step(tmp_path):
    job = build_jobs(2)[-1]
    run = run_local_pipelines([job], initial_states([job]), workdir=tmp_path)[0]
    for report in run.reports:
        assert [s["batch_size"] for s in report["steps"]] == FIXED_SIZES


def per_segment_reference(job: PipelineJob, initial: dict[str, torch.Tensor], bounds: list[float]) -> dict[str, torch.Tensor]:
    """One SGD step with each segment's per-sample gradient clipped to its own bound, computed unsplit."""
    model = job.build_model()
    model.load_state_dict(initial)
    module = GradSampleModule(model, loss_reduction="sum")
    split = build_split(job, device="meta")
    params = dict(model.named_parameters())
    (inputs, targets), = load_callable(job.data)(**job.data_kwargs)
    torch.nn.functional.cross_entropy(module(inputs), targets, reduction="sum").backward()
    with torch.no_grad():
        for stage, bound in enumerate(bounds):
            names = [n for n in split.parameter_names(stage) if n in params]
            norms = torch.stack([params[n].grad_sample.reshape(len(inputs), -1).norm(dim=1) for n in names], dim=1).norm(dim=1)
            factor = (bound / (norms + 1e-6)).clamp(max=1.0)
            for name in names:
                clipped = torch.einsum("i,i...", factor, params[name].grad_sample)
                params[name] -= job.optimizer["lr"] * clipped / EXPECTED_BATCH_SIZE
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "bounds",
    [[0.2, 0.5], stage_bounds(0.4, num_stages=2)],
    ids=["one-bound-per-stage", "one-number-divided"],
)
def test_per_segment_clipping_matches_reference(tmp_path, bounds):
    cuts = even_cuts(mlp(), 2, example_inputs=(torch.zeros(1, 32),))
    job = PipelineJob(
        model="homesplit.models:mlp", example_shape=[1, 32], cuts=cuts,
        data="homesplit.datasets:random_classification", data_kwargs={"sizes": [11], "seed": 5},
        schedule="gpipe", num_microbatches=3, optimizer={"name": "SGD", "lr": 0.5},
        privacy=privacy(clipping="per_segment", max_grad_norm=bounds),
    )  # fmt: skip
    initial = initial_states([job])

    run = run_local_pipelines([job], initial, workdir=tmp_path)[0]

    reference = per_segment_reference(job, initial[0], bounds)
    for key, expected in reference.items():
        torch.testing.assert_close(run.state[key], expected, rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")
