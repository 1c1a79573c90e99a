"""DP noise: std sigma * C per coordinate on every segment, added once per logical step.

The loss has an exactly zero gradient, so with plain SGD at lr 1 the weights
move only by the noise: after K steps, each coordinate has moved by a sum of K
independent draws of std ``sigma * C / expected_batch_size``. A step is split
into 4 micro-batches, so noise per micro-batch would double the std, and one
step is empty, so skipping empty steps would shrink it by sqrt(2/3).
"""

from __future__ import annotations

import math

import pytest
import torch
from privacy_support import STAGE_ENV

from homesplit.job import PipelineJob
from homesplit.local import run_local_pipelines, split_state
from homesplit.models import mlp
from homesplit.partition import even_cuts

SIGMA = 2.0
EXPECTED_BATCH_SIZE = 4.0
SIZES = [4, 0, 6]
STAGES = 3


def noise_job(max_grad_norm, clipping: str, *, stages: int = STAGES, **model_kwargs: int) -> PipelineJob:
    cuts = even_cuts(mlp(**model_kwargs), stages, example_inputs=(torch.zeros(1, 32),))
    return PipelineJob(
        model="homesplit.models:mlp", model_kwargs=model_kwargs, example_shape=[1, 32], cuts=cuts,
        data="homesplit.datasets:random_classification", data_kwargs={"sizes": SIZES, "seed": 1},
        schedule="1f1b", num_microbatches=4, optimizer={"name": "SGD", "lr": 1.0}, loss="privacy_support:zero_loss",
        privacy={
            "mode": "sample", "noise_multiplier": SIGMA, "max_grad_norm": max_grad_norm, "clipping": clipping,
            "sample_rate": 0.1, "expected_batch_size": EXPECTED_BATCH_SIZE, "noise_seed": 7,
        },
    )  # fmt: skip


@pytest.mark.slow
def test_noise_std_per_segment_and_step(tmp_path):
    cases = [(0.5, "whole_model", 0.5), ([0.3, 0.4, 1.2], "per_segment", 1.3)]
    jobs = [noise_job(bound, clipping) for bound, clipping, _ in cases]
    torch.manual_seed(0)
    initial = [job.build_model().state_dict() for job in jobs]

    runs = run_local_pipelines(jobs, initial, workdir=tmp_path, extra_env=STAGE_ENV)

    for job, init, run, (_, clipping, sensitivity) in zip(jobs, initial, runs, cases):
        expected_std = SIGMA * sensitivity / EXPECTED_BATCH_SIZE * math.sqrt(len(SIZES))
        for stage, share in enumerate(split_state(job, init)):
            moved = torch.cat([(run.state[k] - share[k]).reshape(-1) for k in share])
            std = float(moved.std())
            assert std == pytest.approx(expected_std, rel=0.05), f"{clipping} stage {stage}: {moved.numel()} coordinates"
            assert abs(float(moved.mean())) < 4 * expected_std / math.sqrt(moved.numel()), f"{clipping} stage {stage}"


@pytest.mark.slow
def test_stages_draw_independent_noise(tmp_path):
    job = noise_job(0.5, "whole_model", stages=2, depth=2, hidden=32)
    torch.manual_seed(0)
    init = job.build_model().state_dict()

    run = run_local_pipelines([job], [init], workdir=tmp_path, extra_env=STAGE_ENV)[0]

    shares = split_state(job, init)
    moved = [torch.cat([(run.state[k] - s[k]).reshape(-1) for k in s]) for s in shares]
    size = min(m.numel() for m in moved)
    correlation = torch.corrcoef(torch.stack([moved[0][:size], moved[1][:size]]))[0, 1]
    assert abs(float(correlation)) < 4 / math.sqrt(size)
