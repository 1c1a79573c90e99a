"""Partitioning keeps names, reproduces the model, and rejects impossible cuts at split time."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from homesplit.errors import PartitionError
from homesplit.models import groupnorm_cnn, mlp, tiny_transformer
from homesplit.partition import candidate_cuts, even_cuts, split_model

MODELS = {
    "mlp": (mlp, lambda: torch.randn(5, 32)),
    "cnn": (groupnorm_cnn, lambda: torch.randn(5, 1, 8, 8)),
    "transformer": (tiny_transformer, lambda: torch.randint(1, 64, (5, 12))),
}


def run_segments(split, inputs):
    args = inputs
    for k, segment in enumerate(split.segments):
        out = segment(*args)
        if k < split.num_stages - 1:
            leaves = pytree.tree_leaves(out)
            args = pytree.tree_unflatten(leaves, split.boundaries[k].args_spec)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_segments_reproduce_model_output(name, stages):
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x = make_input()
    split = split_model(model, even_cuts(model, stages, example_inputs=(x,)), example_inputs=(x,))
    assert split.num_stages == stages
    torch.testing.assert_close(run_segments(split, (x,)), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_segment_state_dicts_load_strictly(name, stages):
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x = make_input()
    split = split_model(model, even_cuts(model, stages, example_inputs=(x,)), example_inputs=(x,))
    union: dict[str, torch.Tensor] = {}
    for segment in split.segments:
        state = segment.state_dict()
        assert not set(state) & set(union), "two segments hold the same tensor"
        union.update({k: v.clone() + 1 for k, v in state.items()})
    fresh = factory()
    fresh.load_state_dict(union, strict=True)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, union[key])


def test_chain_cut_at_nested_name():
    model = groupnorm_cnn()
    x = torch.randn(2, 1, 8, 8)
    split = split_model(model, ["features.3", "classifier.0"], example_inputs=(x,))
    assert split.method == "chain"
    assert list(split.segments[1].state_dict())[0].startswith("features.3.")
    assert list(split.segments[2].state_dict())[0].startswith("classifier.")


def test_transformer_boundary_carries_mask():
    model = tiny_transformer()
    x = torch.randint(1, 64, (2, 12))
    split = split_model(model, ["blocks.1"], example_inputs=(x,))
    assert split.method == "graph"
    assert split.boundaries[0].num_tensors == 2
    crossing = pytree.tree_leaves(split.segments[0](x))
    assert sorted(str(t.dtype) for t in crossing) == ["torch.bool", "torch.float32"]


def test_split_on_meta_allocates_nothing():
    with torch.device("meta"):
        model = tiny_transformer()
    x = torch.zeros(1, 12, dtype=torch.long, device="meta")
    split = split_model(model, ["blocks.0", "blocks.1"], example_inputs=(x,))
    segment = split.segments[1]
    assert all(p.is_meta for p in segment.parameters())
    segment.to_empty(device="cpu")
    assert all(p.device.type == "cpu" for p in segment.parameters())
    assert all(p.is_meta for p in split.segments[0].parameters())


class _HandsOverInt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x), 3




def test_non_tensor_crossing_fails_at_split_time():
    model = nn.Sequential(_HandsOverInt(), nn.Identity())
    with pytest.raises(PartitionError, match="int"):
        split_model(model, ["1"], example_inputs=(torch.randn(2, 4),))


class _UsesShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x):
        h = self.first(x)
        size = h.size(0)  # a Python int in the traced graph's example run
        return self.second(h).reshape(size, -1)


def test_graph_rejects_int_crossing_cut():
    with pytest.raises(PartitionError, match="size"):
        split_model(_UsesShape(), ["second"], example_inputs=(torch.randn(2, 4),))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, tokens):
        h = self.mid(self.embed(tokens))
        return h @ self.embed.weight.t()


def test_graph_rejects_weight_used_twice():
    with pytest.raises(PartitionError, match="embed.weight"):
        split_model(_Tied(), ["mid"], example_inputs=(torch.randint(0, 10, (2, 3)),))


@pytest.mark.parametrize(
    ("cuts", "message"),
    [
        (["nope"], "nope"),
        (["4", "2"], "does not come after"),
        (["2", "2"], "twice"),
        ("2", "not a string"),
    ],
)
def test_bad_cuts_are_rejected(cuts, message):
    with pytest.raises(PartitionError, match=message):
        split_model(mlp(), cuts, example_inputs=(torch.randn(2, 32),))


def test_graph_bad_cut_lists_modules():
    with pytest.raises(PartitionError, match="blocks.0"):
        split_model(tiny_transformer(), ["nothing"], example_inputs=(torch.randint(1, 64, (2, 12)),))


def test_too_many_stages_rejected():
    with pytest.raises(PartitionError, match="at most 9 segments"):
        even_cuts(mlp(), 10, example_inputs=(torch.randn(2, 32),))


def test_candidate_cuts_of_transformer():
    cuts = candidate_cuts(tiny_transformer(), example_inputs=(torch.randint(1, 64, (2, 12)),))
    assert cuts == ["position", "blocks.0", "blocks.1", "norm", "head"]


def test_even_cuts_balance_parameters():
    model = mlp(depth=6)
    cuts = even_cuts(model, 3, example_inputs=(torch.randn(2, 32),))
    split = split_model(model, cuts, example_inputs=(torch.randn(2, 32),))
    counts = [sum(p.numel() for p in s.parameters()) for s in split.segments]
    assert max(counts) < 0.5 * sum(counts)


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.second = nn.Sequential(nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("kind", ["chain", "graph"])
def test_split_keeps_batchnorm_statistics(kind):
    torch.manual_seed(0)
    if kind == "chain":
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3))
        cut = "2"
    else:
        model = _BatchNormNet()
        cut = "second"
    model.train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}

    split = split_model(model, [cut], example_inputs=(torch.randn(6, 4) * 5 + 3,))

    assert split.method == kind
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0, msg=f"{name} changed")


def test_split_restores_training_flags():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[1].eval()
    flags = {name: module.training for name, module in model.named_modules()}

    split = split_model(model, ["2"], example_inputs=(torch.randn(6, 4),))

    assert {name: module.training for name, module in model.named_modules()} == flags
    assert split.segments[0].training
