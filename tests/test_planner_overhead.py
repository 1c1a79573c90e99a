"""Tests of the stage runtime overhead measurement and its place in the profile cache."""

from __future__ import annotations

import pytest
import torch

import homesplit.planner.profile as profile_module
from homesplit.errors import ConfigError
from homesplit.models import mlp
from homesplit.planner.overhead import measure_stage_overhead
from homesplit.planner.profile import profile_model


def test_profile_caches_stage_overhead(tmp_path, monkeypatch):
    cache = tmp_path / "profiles.json"
    torch.manual_seed(0)
    model = mlp(in_features=8, hidden=8, depth=2, classes=2)
    inputs = (torch.randn(8, 8),)

    without = profile_model(model, inputs, cache_path=cache, repeats=1)
    # A cached profile without the figure gets it measured by real stage
    # processes, with the profile's torch threads: one, as stages run by default.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured = profile_model(model, inputs, cache_path=cache, repeats=1, measure_overhead=True)
    finally:
        torch.set_num_threads(threads)

    def fail() -> float:
        raise AssertionError("the overhead was measured again although it is cached")

    monkeypatch.setattr(profile_module, "_measure_overhead", fail)
    cached = profile_model(model, inputs, cache_path=cache, repeats=1, measure_overhead=True)

    assert without.stage_overhead_seconds is None
    assert measured.layers == without.layers
    assert measured.stage_overhead_seconds > 0
    # A runtime that costs a second per micro-batch would make every step of a small model take seconds.
    assert measured.stage_overhead_seconds < 1.0
    assert cached == measured


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        ({"microbatch_counts": (16, 2)}, "two increasing positive integers"),
        ({"microbatch_counts": (2,)}, "two increasing positive integers"),
        ({"microbatch_counts": (0, 4)}, "two increasing positive integers"),
        ({"steps": 2, "warmup_steps": 2}, "steps=2 must exceed warmup_steps=2"),
        ({"rounds": 0}, "rounds=0"),
    ],
)
def test_overhead_rejects_invalid_arguments(arguments, fragment):
    with pytest.raises(ConfigError, match=fragment):
        measure_stage_overhead(**arguments)
