"""Cut a model into consecutive segments that keep the full model's names.

Two front ends produce the same kind of result:

- Chain splitting for `nn.Sequential` models (nested Sequentials are
  flattened): a cut names the first module of the next segment, such as
  ``"3"`` or ``"features.3"``.
- Graph splitting for any model that `torch.fx` can trace, such as a
  transformer with embeddings, blocks and a head. A cut names a submodule
  (``"blocks.2"``); the first graph node that uses it starts the next segment.
  Values that a later segment needs are passed through the segments in
  between.

torch.fx was chosen over the torch.export front end of
torch.distributed.pipelining because `torch.fx.GraphModule` copies the
referenced submodules under their qualified names, so every segment's
``state_dict`` keys are the full model's keys, and because it needs no process
group. The c10d runtime of torch.distributed has no authentication and is not
used.

Whatever crosses a cut must be a tensor or a tuple, list or dict of tensors.
That is checked once, at split time, by running example inputs through the
segments; example inputs on the ``meta`` device cost no memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from homesplit.errors import PartitionError
from homesplit.partition_graph import _eval_mode, _node_uses, _split_graph, _trace

__all__ = ["SplitModel", "Boundary", "split_model", "candidate_cuts", "even_cuts", "flatten_value"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Boundary:
    """Tensors that cross one cut, and how to rebuild the next segment's arguments.

    Attributes
    ----------
    cut : str
        Name of the module that starts the next segment.
    args_spec : pytree.TreeSpec
        Structure of the next segment's positional arguments; rebuild them with
        ``pytree.tree_unflatten(tensors, args_spec)``.
    num_tensors : int
        Number of tensors that cross, in `flatten_value` order.
    """

    cut: str
    args_spec: Any
    num_tensors: int


@dataclass
class SplitModel:
    """A model cut into consecutive segments.

    Attributes
    ----------
    segments : list of nn.Module
        Segment ``k`` takes the positional arguments that boundary ``k - 1``
        describes (segment 0 takes the model's inputs) and returns the value
        that crosses boundary ``k``; the last segment returns the model output.
        Parameter and buffer names equal those of the full model.
    boundaries : list of Boundary
        One per cut, ``len(segments) - 1`` in all.
    method : {"chain", "graph"}
        Which front end produced the split.
    """

    segments: list[nn.Module]
    boundaries: list[Boundary]
    method: str
    cuts: list[str] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        """Number of segments."""
        return len(self.segments)

    def parameter_names(self, stage: int) -> list[str]:
        """Return the state_dict names that segment `stage` holds."""
        return list(self.segments[stage].state_dict().keys())


def flatten_value(value: Any) -> list[torch.Tensor]:
    """Flatten a boundary value into its tensors, in a fixed order."""
    leaves, _ = pytree.tree_flatten(value)
    return leaves


def _as_args(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _chain_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    chain: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            chain.extend(_chain_modules(child, qualified + "."))
        else:
            chain.append((qualified, child))
    return chain


class ChainSegment(nn.Module):
    """Consecutive modules of an `nn.Sequential`, kept under their full names.

    Parameters
    ----------
    modules : list of (str, nn.Module)
        Qualified names and modules, in execution order.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self._order = [name for name, _ in modules]
        for name, module in modules:
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, module)

    def forward(self, value: Any) -> Any:  # noqa: D102 - nn.Module contract
        for name in self._order:
            value = self.get_submodule(name)(value)
        return value

    def extra_repr(self) -> str:
        return f"modules={self._order[0]}..{self._order[-1]}" if self._order else "empty"


def _chain_cut_index(chain: list[tuple[str, nn.Module]], cut: str) -> int:
    for index, (name, _) in enumerate(chain):
        if name == cut or name.startswith(cut + "."):
            return index
    raise PartitionError(
        f"cut {cut!r} names no module of the model; valid cuts are {[n for n, _ in chain[1:]]}"
    )


def _split_chain(model: nn.Sequential, cuts: Sequence[str]) -> list[nn.Module]:
    chain = _chain_modules(model)
    if not chain:
        raise PartitionError("the nn.Sequential model has no modules to split")
    starts = [0] + [_chain_cut_index(chain, cut) for cut in cuts] + [len(chain)]
    for k in range(1, len(starts)):
        if starts[k] <= starts[k - 1]:
            name = cuts[k - 1] if k - 1 < len(cuts) else "end"
            raise PartitionError(
                f"cut {name!r} does not come after the previous cut; give cuts in execution order, "
                f"each starting a non-empty segment"
            )
    return [ChainSegment(chain[starts[k] : starts[k + 1]]) for k in range(len(starts) - 1)]




def split_model(
    model: nn.Module,
    cuts: Sequence[str],
    *,
    example_inputs: tuple,
    leaf_modules: Sequence[type] = (),
) -> SplitModel:
    """Cut `model` into ``len(cuts) + 1`` consecutive segments.

    Parameters
    ----------
    model : nn.Module
        The full model. It may live on the ``meta`` device; segments share its
        submodules, so materialise them with ``segment.to_empty(device=...)``
        and load weights afterwards.
    cuts : sequence of str
        Qualified module names, in execution order; each starts a new segment.
        An empty sequence gives one segment.
    example_inputs : tuple
        Positional inputs of the model, used to check what crosses each cut.
        They must be on the same device as the model.
    leaf_modules : sequence of type, optional
        Module classes that graph splitting treats as opaque, for code that
        torch.fx cannot trace.

    Returns
    -------
    SplitModel

    Raises
    ------
    PartitionError
        If a cut names no module, cuts are out of order, a non-tensor value
        would cross a cut, or a weight would be shared by two segments.
    """
    if isinstance(cuts, str):
        raise PartitionError(f"cuts={cuts!r} must be a list of module names, not a string")
    cuts = list(cuts)
    if len(set(cuts)) != len(cuts):
        raise PartitionError(f"cuts {cuts} name a module twice; each cut must start a different segment")
    if isinstance(model, nn.Sequential):
        segments = _split_chain(model, cuts)
        method = "chain"
    else:
        segments = _split_graph(model, cuts, tuple(example_inputs), leaf_modules)
        method = "graph"
    boundaries = _check_boundaries(segments, cuts, tuple(example_inputs))
    logger.debug("Split %s into %d segments (%s) at %s", type(model).__name__, len(segments), method, cuts)
    return SplitModel(segments=segments, boundaries=boundaries, method=method, cuts=cuts)


def _check_boundaries(segments: list[nn.Module], cuts: list[str], example_inputs: tuple) -> list[Boundary]:
    boundaries = []
    args = example_inputs
    with torch.no_grad(), _eval_mode(segments):
        for k, segment in enumerate(segments[:-1]):
            value = segment(*args)
            leaves, spec = pytree.tree_flatten(_as_args(value) if isinstance(segment, torch.fx.GraphModule) else (value,))
            for leaf in leaves:
                if not isinstance(leaf, torch.Tensor):
                    raise PartitionError(
                        f"segment {k} hands a {type(leaf).__name__} across the cut at {cuts[k]!r}; only tensors "
                        "and tuples, lists or dicts of tensors can be sent between devices"
                    )
            boundaries.append(Boundary(cut=cuts[k], args_spec=spec, num_tensors=len(leaves)))
            args = pytree.tree_unflatten(leaves, spec)
    return boundaries


def candidate_cuts(model: nn.Module, *, example_inputs: tuple | None = None, leaf_modules: Sequence[type] = ()) -> list[str]:
    """Return the cut names that `split_model` accepts, in execution order.

    For an `nn.Sequential`, every module of the flattened chain but the first.
    For other models, every top-level child and every item of a top-level
    container (``"blocks.3"``) that starts a traced call, but the first.
    `example_inputs` is accepted for symmetry with `split_model` and unused.
    """
    if isinstance(model, nn.Sequential):
        return [name for name, _ in _chain_modules(model)[1:]]
    gm = _trace(model, leaf_modules)
    containers = {name for name, m in model.named_children() if isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict))}
    seen: list[str] = []
    for node in gm.graph.nodes:
        for use in _node_uses(node):
            parts = use.split(".")
            name = ".".join(parts[:2]) if parts[0] in containers and len(parts) > 1 else parts[0]
            if name not in seen:
                seen.append(name)
    return seen[1:]


def even_cuts(
    model: nn.Module,
    num_stages: int,
    *,
    example_inputs: tuple | None = None,
    leaf_modules: Sequence[type] = (),
) -> list[str]:
    """Choose cuts that balance the parameter count of `num_stages` segments.

    A simple default for when no profile exists; `homesplit.planner` chooses
    cuts from measured costs instead.

    Raises
    ------
    PartitionError
        If the model has fewer candidate cuts than ``num_stages - 1``.
    """
    candidates = candidate_cuts(model, example_inputs=example_inputs, leaf_modules=leaf_modules)
    if num_stages < 1:
        raise PartitionError(f"num_stages={num_stages} must be at least 1")
    if num_stages - 1 > len(candidates):
        raise PartitionError(
            f"{type(model).__name__} can be cut in at most {len(candidates) + 1} segments, "
            f"not num_stages={num_stages}"
        )
    if num_stages == 1:
        return []
    units = _unit_weights(model, candidates, example_inputs, leaf_modules)
    return _balance(candidates, units, num_stages)


def _balance(candidates: list[str], units: list[float], num_stages: int) -> list[str]:
    """Cut the units into `num_stages` consecutive groups minimising the largest group."""
    n = len(units)
    prefix = [0.0]
    for weight in units:
        prefix.append(prefix[-1] + weight)
    inf = float("inf")
    # best[s][i]: smallest possible largest group when the first i units form s groups.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for groups in range(1, num_stages + 1):
        for i in range(groups, n + 1):
            for j in range(groups - 1, i):
                cost = max(best[groups - 1][j], prefix[i] - prefix[j])
                if cost < best[groups][i]:
                    best[groups][i] = cost
                    choice[groups][i] = j
    starts = []
    i = n
    for groups in range(num_stages, 0, -1):
        i = choice[groups][i]
        starts.append(i)
    # starts contains each group's first unit; unit k > 0 begins at candidates[k - 1].
    return [candidates[k - 1] for k in sorted(starts) if k > 0]


def _unit_weights(
    model: nn.Module, candidates: list[str], example_inputs: tuple | None, leaf_modules: Sequence[type]
) -> list[float]:
    """Parameter count of each unit between consecutive candidate cuts, plus one.

    Splitting at every candidate measures the units exactly. Where that split
    is impossible (a weight shared by two units, say) every unit counts alike.
    """
    try:
        units = split_model(model, candidates, example_inputs=example_inputs or (), leaf_modules=leaf_modules)
    except PartitionError:
        return [1.0] * (len(candidates) + 1)
    return [1.0 + sum(p.numel() for p in segment.parameters()) for segment in units.segments]
