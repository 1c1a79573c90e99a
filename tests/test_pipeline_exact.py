"""The split pipeline trains exactly like the unsplit model.

Every case runs each stage in its own OS process over loopback TCP and
compares every parameter after 5 optimizer steps with single-process training
of the unsplit model from the same weights and data order.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from homesplit.job import PipelineJob
from homesplit.local import run_local_pipelines, train_reference
from homesplit.models import groupnorm_cnn, mlp, tiny_transformer
from homesplit.partition import even_cuts

MODELS = {
    "mlp": ("homesplit.models:mlp", [1, 32], "float32", "homesplit.datasets:random_classification", mlp),
    "cnn": ("homesplit.models:groupnorm_cnn", [1, 1, 8, 8], "float32", "homesplit.datasets:random_images", groupnorm_cnn),
    "transformer": (
        "homesplit.models:tiny_transformer", [1, 12], "int64", "homesplit.datasets:random_tokens", tiny_transformer,
    ),
}  # fmt: skip

# Adam normalises each gradient coordinate, so a coordinate whose gradient nearly
# cancels to zero turns summation-order rounding into a step of up to lr. A small
# lr keeps that below the tolerance, while a real pairing or scaling error still
# moves every coordinate by about lr.
OPTIMIZERS = [{"name": "SGD", "lr": 0.05, "momentum": 0.9}, {"name": "Adam", "lr": 0.001}]


VARYING_SIZES = [13, 0, 1, 3, 29, 0, 2, 8]


def build_jobs(name: str, stages: int) -> list[PipelineJob]:
    model_ref, shape, dtype, data_ref, factory = MODELS[name]
    example = torch.zeros(shape, dtype=getattr(torch, dtype))
    cuts = even_cuts(factory(), stages, example_inputs=(example,))
    jobs = []
    for schedule, microbatches, optimizer in itertools.product(["gpipe", "1f1b"], [1, 2, 4, 7], OPTIMIZERS):
        jobs.append(
            PipelineJob(
                model=model_ref, example_shape=shape, example_dtype=dtype, cuts=cuts, data=data_ref,
                data_kwargs={"steps": 5, "batch_size": 16, "seed": microbatches},
                schedule=schedule, num_microbatches=microbatches, optimizer=optimizer,
            )
        )  # fmt: skip
    # A different size at every step, as Poisson sampling gives: empty steps,
    # fewer samples than micro-batches or stages, and a smaller last micro-batch.
    for schedule in ("gpipe", "1f1b"):
        jobs.append(
            PipelineJob(
                model=model_ref, example_shape=shape, example_dtype=dtype, cuts=cuts, data=data_ref,
                data_kwargs={"sizes": VARYING_SIZES, "seed": 11},
                schedule=schedule, num_microbatches=4, optimizer=OPTIMIZERS[1],
            )
        )  # fmt: skip
    return jobs


def describe(job: PipelineJob) -> str:
    return f"{job.schedule} M={job.num_microbatches} {job.optimizer['name']} data={job.data_kwargs}"


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_pipeline_matches_unsplit_training(name, stages, tmp_path):
    jobs = build_jobs(name, stages)
    initial = []
    for index, job in enumerate(jobs):
        torch.manual_seed(index)
        initial.append(job.build_model().state_dict())

    runs = run_local_pipelines(jobs, initial, workdir=tmp_path)

    for job, init, run in zip(jobs, initial, runs):
        reference, _ = train_reference(job, init)
        assert set(run.state) == set(reference), describe(job)
        for key, expected in reference.items():
            torch.testing.assert_close(run.state[key], expected, rtol=0, atol=1e-5, msg=lambda m: f"{key} {describe(job)}: {m}")


@pytest.mark.slow
def test_empty_minibatches_take_no_step(tmp_path):
    job = build_jobs("mlp", 3)[-1]
    torch.manual_seed(0)
    run = run_local_pipelines([job], [job.build_model().state_dict()], workdir=tmp_path)[0]
    for report in run.reports:
        assert [s["batch_size"] for s in report["steps"]] == VARYING_SIZES
        empty = [s for s in report["steps"] if s["batch_size"] == 0]
        assert [s["microbatches"] for s in empty] == [0, 0]
    last = run.reports[-1]["steps"]
    losses = [s["loss_sum"] for s in last if s["batch_size"]]
    assert all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.slow
def test_loss_reported_by_last_stage(tmp_path):
    job = build_jobs("cnn", 2)[0]
    torch.manual_seed(0)
    init = job.build_model().state_dict()
    run = run_local_pipelines([job], [init], workdir=tmp_path)[0]
    _, losses = train_reference(job, init)
    steps = run.reports[-1]["steps"]
    pipeline_losses = [s["loss_sum"] / s["batch_size"] for s in steps]
    assert pipeline_losses == pytest.approx(losses, abs=1e-5)


@pytest.mark.slow
def test_stage_without_parameters_trains(tmp_path):
    # Stage 1 holds only the ReLU "1", so it has nothing to step but must relay gradients.
    job = PipelineJob(
        model="homesplit.models:mlp", example_shape=[1, 32], cuts=["1", "2"],
        data="homesplit.datasets:random_classification", data_kwargs={"steps": 3}, num_microbatches=2,
    )  # fmt: skip
    torch.manual_seed(0)
    init = job.build_model().state_dict()
    run = run_local_pipelines([job], [init], workdir=tmp_path)[0]
    reference, _ = train_reference(job, init)
    for key, expected in reference.items():
        torch.testing.assert_close(run.state[key], expected, rtol=0, atol=1e-5)
