"""Layers that DP cannot train are rejected before the first step, by name, on every segment."""

from __future__ import annotations

import pytest
import torch
from privacy_support import STAGE_ENV, batchnorm_mlp
from torch import nn

from homesplit.errors import PrivacyError
from homesplit.job import PipelineJob
from homesplit.local import PipelineRunError, run_local_pipelines
from homesplit.partition import split_model
from homesplit.privacy.validation import check_segments

PRIVACY = {"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.1, "expected_batch_size": 4}


def model_with_batchnorm_at(position: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()]
    layers[position] = nn.BatchNorm1d(8)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("position", [1, 3, 5])
def test_batchnorm_rejected_in_any_segment(position):
    split = split_model(model_with_batchnorm_at(position), ["2", "4"], example_inputs=(torch.zeros(2, 8),))

    with pytest.raises(PrivacyError) as caught:
        check_segments(split.segments)

    message = str(caught.value)
    assert f"stage {position // 2}" in message
    assert f"layer '{position}'" in message
    assert "BatchNorm1d" in message
    assert "GroupNorm" in message


def test_batchnorm_fixed_on_request():
    split = split_model(model_with_batchnorm_at(3), ["2", "4"], example_inputs=(torch.zeros(2, 8),))

    fixed = check_segments(split.segments, fix=True)

    assert isinstance(fixed[1].get_submodule("3"), nn.GroupNorm)


def batchnorm_job(*, fix: bool) -> PipelineJob:
    return PipelineJob(
        model="privacy_support:batchnorm_mlp", example_shape=[2, 32], cuts=["2", "4"],
        data="homesplit.datasets:random_classification", data_kwargs={"sizes": [8, 6], "seed": 0},
        num_microbatches=2, privacy={**PRIVACY, "fix_modules": fix},
    )  # fmt: skip


@pytest.mark.slow
def test_pipeline_rejects_batchnorm_before_first_step(tmp_path):
    job = batchnorm_job(fix=False)
    torch.manual_seed(0)

    with pytest.raises(PipelineRunError) as caught:
        run_local_pipelines([job], [batchnorm_mlp().state_dict()], workdir=tmp_path, extra_env=STAGE_ENV)

    assert "layer '3'" in str(caught.value)
    assert "GroupNorm" in str(caught.value)
    for report in caught.value.reports:
        assert "steps" not in report, f"stage {report['stage']} reported steps"


@pytest.mark.slow
def test_pipeline_trains_with_fixed_batchnorm(tmp_path):
    job = batchnorm_job(fix=True)
    torch.manual_seed(0)

    run = run_local_pipelines([job], [batchnorm_mlp().state_dict()], workdir=tmp_path, extra_env=STAGE_ENV)[0]

    assert [s["batch_size"] for s in run.reports[0]["steps"]] == [8, 6]
    assert "3.running_mean" not in run.state
