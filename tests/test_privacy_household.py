"""Household-level DP: the whole round update is clipped across all segments, then noised."""

from __future__ import annotations

import math

import pytest
import torch

from homesplit.errors import PrivacyError
from homesplit.job import PipelineJob
from homesplit.local import run_local_pipelines, train_reference
from homesplit.models import mlp
from homesplit.partition import even_cuts
from homesplit.privacy.household import add_update_noise, central_noise_std, clip_update, squared_norm, update_of

BOUND = 0.01


def test_clip_update_bounds_whole_norm():
    update = {"a": torch.full((3,), 2.0), "b": torch.full((4,), 1.0)}
    total = math.sqrt(squared_norm(update))

    clipped = clip_update(update, total_norm=total, max_norm=1.0)

    assert total == pytest.approx(4.0)
    assert math.sqrt(squared_norm(clipped)) == pytest.approx(1.0, abs=1e-6)


def test_clip_update_keeps_small_update():
    update = {"a": torch.tensor([0.1, 0.2])}

    clipped = clip_update(update, total_norm=math.sqrt(squared_norm(update)), max_norm=1.0)

    assert torch.equal(clipped["a"], update["a"])


def test_update_noise_has_expected_std():
    update = {"a": torch.zeros(100_000)}

    noised = add_update_noise(update, noise_multiplier=1.5, max_norm=0.2, generator=torch.Generator().manual_seed(0))

    assert float(noised["a"].std()) == pytest.approx(0.3, rel=0.02)


def test_update_of_needs_initial_keys():
    with pytest.raises(PrivacyError, match="lack"):
        update_of({}, {"w": torch.zeros(2)})


def test_central_noise_std_scales_with_households():
    assert central_noise_std(noise_multiplier=1.0, max_norm=2.0, expected_households=10) == pytest.approx(0.2)


def household_job(*, noise_multiplier: float, lr: float) -> PipelineJob:
    cuts = even_cuts(mlp(), 3, example_inputs=(torch.zeros(1, 32),))
    return PipelineJob(
        model="homesplit.models:mlp", example_shape=[1, 32], cuts=cuts,
        data="homesplit.datasets:random_classification", data_kwargs={"steps": 3, "batch_size": 16, "seed": 2},
        num_microbatches=2, optimizer={"name": "SGD", "lr": lr},
        privacy={
            "mode": "household", "noise_multiplier": noise_multiplier, "max_grad_norm": BOUND,
            "sample_rate": 0.5, "noise_seed": 3,
        },
    )  # fmt: skip


@pytest.mark.slow
def test_household_update_clipped_over_all_segments(tmp_path):
    clipped_job = household_job(noise_multiplier=0.0, lr=0.1)
    noised_job = household_job(noise_multiplier=2.0, lr=0.0)
    torch.manual_seed(0)
    init = clipped_job.build_model().state_dict()

    runs = run_local_pipelines([clipped_job, noised_job], [init, init], workdir=tmp_path)

    reference, _ = train_reference(clipped_job, init)
    update = update_of(init, reference)
    norm = math.sqrt(squared_norm(update))
    assert norm > BOUND, "the update must be larger than the bound for this test to clip"
    for key, delta in clip_update(update, total_norm=norm, max_norm=BOUND).items():
        torch.testing.assert_close(runs[0].state[key], init[key] + delta, rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")

    noise = torch.cat([(runs[1].state[k] - init[k]).reshape(-1) for k in init])
    assert float(noise.std()) == pytest.approx(2.0 * BOUND, rel=0.05)
