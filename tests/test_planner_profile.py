"""Tests of layer profiling by running a model, and of the device self-benchmark."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import homesplit.planner.profile as profile_module
from homesplit.errors import ConfigError
from homesplit.models import mlp, tiny_transformer
from homesplit.partition import candidate_cuts, split_model
from homesplit.planner.benchmark import benchmark_device, measure_matmul_flops
from homesplit.planner.optimize import plan_household
from homesplit.planner.profile import model_signature, profile_model
from homesplit.planner.profiles import DeviceProfile

# Few repeats keep the tests fast; timing accuracy is not under test here.
REPEATS = 2


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(in_features=32, hidden=64, depth=2, classes=10)


def test_mlp_profile_byte_counts():
    profile = profile_model(small_mlp(), (torch.randn(16, 32),), repeats=REPEATS)
    first = profile.layers[0]

    assert [layer.name for layer in profile.layers] == ["0", "1", "2", "3", "4"]
    assert first.parameter_count == 32 * 64 + 64
    assert first.parameter_bytes == 4 * (32 * 64 + 64)
    assert first.gradient_bytes == 4 * (32 * 64 + 64)
    # The Linear output of 64 float32s per sample crosses the cut.
    assert first.output_bytes_per_sample == 64 * 4
    # The Linear keeps its 32-float input for the weight gradient.
    assert first.activation_bytes_per_sample == 32 * 4
    assert first.seconds_per_sample > 0


def test_units_follow_candidate_cuts():
    model = small_mlp()
    profile = profile_model(model, (torch.randn(4, 32),), repeats=REPEATS)
    cuts = candidate_cuts(model)

    assert [layer.cut for layer in profile.layers] == [*cuts, None]


def test_adam_state_matches_torch():
    model = small_mlp()
    profile = profile_model(model, (torch.randn(4, 32),), repeats=REPEATS)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()

    measured = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values())
    assert sum(layer.optimizer_bytes["adam"] for layer in profile.layers) == measured


def test_transformer_profile_has_every_unit():
    torch.manual_seed(0)
    model = tiny_transformer()
    tokens = torch.randint(1, 64, (8, 16))
    profile = profile_model(model, (tokens,), repeats=REPEATS)

    assert len(profile.layers) == len(candidate_cuts(model)) + 1
    assert sum(layer.parameter_count for layer in profile.layers) == sum(p.numel() for p in model.parameters())
    assert all(layer.output_bytes_per_sample > 0 for layer in profile.layers)


def test_cache_returns_stored_profile(tmp_path, monkeypatch):
    cache = tmp_path / "profiles.json"
    inputs = (torch.randn(4, 32),)
    first = profile_model(small_mlp(), inputs, cache_path=cache, repeats=REPEATS)

    def fail(*args, **kwargs):
        raise AssertionError("the model ran although its profile is cached")

    monkeypatch.setattr(profile_module, "_profile_unit", fail)
    second = profile_model(small_mlp(), inputs, cache_path=cache, repeats=REPEATS)

    assert second == first


def test_cache_keys_differ_by_batch_shape():
    model = small_mlp()
    cuts = candidate_cuts(model)

    assert model_signature(model, (torch.randn(4, 32),), cuts) != model_signature(model, (torch.randn(8, 32),), cuts)


def test_unreadable_cache_is_replaced(tmp_path):
    cache = tmp_path / "profiles.json"
    cache.write_text("{not json", encoding="utf-8")
    profile = profile_model(small_mlp(), (torch.randn(4, 32),), cache_path=cache, repeats=REPEATS)

    assert profile_model(small_mlp(), (torch.randn(4, 32),), cache_path=cache, repeats=REPEATS) == profile


def test_profiling_restores_model_state():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    profile_model(model, (torch.randn(16, 8),), repeats=REPEATS)

    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    for name, parameter in model.named_parameters():
        assert parameter.grad is None, name


def test_meta_model_raises_config_error():
    with torch.device("meta"):
        model = small_mlp()
    with pytest.raises(ConfigError, match="meta"):
        profile_model(model, (torch.randn(4, 32),))


def test_planned_cuts_split_the_model():
    model = small_mlp()
    inputs = (torch.randn(8, 32),)
    profile = profile_model(model, inputs, repeats=REPEATS)
    # No device fits the whole model, but each fits its largest unit with Adam's two step temporaries.
    total = sum(layer.static_bytes("adam") for layer in profile.layers)
    temporaries = 2 * max(layer.largest_gradient_bytes for layer in profile.layers)
    devices = [DeviceProfile(name=f"device{i}", speed=1.0, memory_bytes=total * 3 // 4 + temporaries) for i in range(3)]
    plan = plan_household(profile.layers, devices, batch_size=8)
    split = split_model(model, plan.cuts, example_inputs=inputs)

    assert plan.num_stages >= 2
    assert split.num_stages == plan.num_stages


def test_device_benchmark_reports_speed():
    reference = measure_matmul_flops(size=64, min_seconds=0.02)
    device = benchmark_device("laptop", reference_flops_per_second=reference, size=64, min_seconds=0.02)

    assert device.speed > 0
    assert device.memory_bytes > 0
    assert device.name == "laptop"


def test_profile_times_every_microbatch_size():
    profile = profile_model(small_mlp(), (torch.randn(16, 32),), repeats=REPEATS)

    for layer in profile.layers:
        # ceil(16 / M) for the planner's default counts 1, 2, 4, 8 and 16.
        assert sorted(layer.seconds_per_sample_by_microbatch) == [1, 2, 4, 8, 16]
        assert all(seconds > 0 for seconds in layer.seconds_per_sample_by_microbatch.values())
        assert layer.seconds_per_sample == layer.seconds_per_sample_by_microbatch[16]


def test_explicit_microbatch_sizes_keep_full_batch():
    profile = profile_model(small_mlp(), (torch.randn(16, 32),), repeats=REPEATS, microbatch_sizes=[3, 64])

    assert sorted(profile.layers[0].seconds_per_sample_by_microbatch) == [3, 16]


def test_microbatch_size_that_raises_is_left_out(caplog):
    # BatchNorm in training mode rejects a batch of one sample.
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with caplog.at_level("WARNING", logger="homesplit.planner.unit_timing"):
        profile = profile_model(model, (torch.randn(4, 8),), repeats=REPEATS)

    assert sorted(profile.layers[0].seconds_per_sample_by_microbatch) == [2, 4]
    assert "micro-batches of [1] samples" in caplog.text
