"""Graph front end of `homesplit.partition`: split any model that torch.fx can trace.

A cut names a submodule; the first graph node that uses it starts the next
segment. Each segment is a `torch.fx.GraphModule` built from the root model,
so its submodules and parameters keep their qualified names. Values that a
later segment needs are passed through the segments in between, and a tuple,
list or dict of tensors crosses a cut as its tensors and is rebuilt on the far
side.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from homesplit.errors import PartitionError

def _trace(model: nn.Module, leaf_modules: Sequence[type] = ()) -> torch.fx.GraphModule:
    leaves = tuple(leaf_modules)

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds for untraceable code
        raise PartitionError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Make the model an nn.Sequential, "
            "or pass the submodules with data-dependent control flow as leaf_modules"
        ) from exc
    return torch.fx.GraphModule(model, graph)


def _node_uses(node: torch.fx.Node) -> list[str]:
    """Qualified names of the modules or attributes that one node touches."""
    if node.op in ("call_module", "get_attr"):
        return [str(node.target)]
    return []


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put `modules` and their submodules in eval mode, and restore each one's training flag on exit.

    The split-time checks run example inputs through the model. In training
    mode that would update BatchNorm running statistics and draw dropout masks.
    """
    flags = {id(m): (m, m.training) for module in modules for m in module.modules()}
    try:
        for module, _ in flags.values():
            module.training = False
        yield
    finally:
        for module, training in flags.values():
            module.training = training


def _record_values(gm: torch.fx.GraphModule, example_inputs: tuple) -> dict[torch.fx.Node, Any]:
    values: dict[torch.fx.Node, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            values[n] = result
            return result

    with torch.no_grad(), _eval_mode([gm]):
        _Recorder(gm).run(*example_inputs)
    return values


def _leaf_keys(node: torch.fx.Node, value: Any, cut: str) -> list[Any]:
    """Keys that pick the tensors out of a crossing value; None means the value itself."""
    if isinstance(value, torch.Tensor):
        return [None]
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(range(len(value)))
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return list(value.keys())
    raise PartitionError(
        f"value {node.name!r} of type {type(value).__name__} would cross the cut at {cut!r}, but only tensors "
        "and tuples, lists or dicts of tensors can be sent between devices; move the cut so that this value "
        "stays inside one segment"
    )


def _rebuild_tuple(*items: torch.Tensor) -> tuple:
    return tuple(items)


def _rebuild_list(*items: torch.Tensor) -> list:
    return list(items)


def _rebuild_dict(keys: tuple, *items: torch.Tensor) -> dict:
    return dict(zip(keys, items))


def _assign_stages(gm: torch.fx.GraphModule, cuts: Sequence[str]) -> dict[torch.fx.Node, int]:
    nodes = list(gm.graph.nodes)
    starts = []
    for cut in cuts:
        index = next(
            (i for i, n in enumerate(nodes) if any(u == cut or u.startswith(cut + ".") for u in _node_uses(n))),
            None,
        )
        if index is None:
            valid = sorted({u for n in nodes for u in _node_uses(n) if n.op == "call_module"})
            raise PartitionError(f"cut {cut!r} names no module the traced model calls; modules called: {valid}")
        if starts and index <= starts[-1]:
            raise PartitionError(f"cut {cut!r} does not come after the previous cut in execution order")
        starts.append(index)
    stage_of: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            stage_of[node] = 0
        elif node.op == "output":
            stage_of[node] = len(cuts)
        else:
            stage_of[node] = sum(1 for s in starts if s <= i)
    return stage_of


def _check_unshared(gm: torch.fx.GraphModule, stage_of: dict[torch.fx.Node, int]) -> None:
    """Reject a module or parameter used by two segments: both would hold it."""
    owner: dict[str, int] = {}
    for node, stage in stage_of.items():
        for name in _node_uses(node):
            if node.op == "get_attr":
                params = [name]
            else:
                # Stateless modules (an activation reused by every block) may be shared.
                params = [f"{name}.{p}" for p, _ in gm.get_submodule(name).state_dict().items()]
            for param in params:
                if owner.setdefault(param, stage) != stage:
                    raise PartitionError(
                        f"{param!r} is used by segment {owner[param]} and segment {stage} (tied or reused weights); "
                        "choose cuts that keep every use of it in one segment"
                    )


def _split_graph(
    model: nn.Module, cuts: Sequence[str], example_inputs: tuple, leaf_modules: Sequence[type]
) -> list[nn.Module]:
    gm = _trace(model, leaf_modules)
    stage_of = _assign_stages(gm, cuts)
    _check_unshared(gm, stage_of)
    values = _record_values(gm, example_inputs)
    num_stages = len(cuts) + 1
    nodes = list(gm.graph.nodes)

    # last_use[n] is the last stage that reads node n.
    last_use = {n: stage_of[n] for n in nodes}
    for n in nodes:
        for user in n.users:
            last_use[n] = max(last_use[n], stage_of[user])

    # crossing[k] lists the nodes whose values cross cut k, in graph order.
    crossing = [
        [n for n in nodes if n.op != "output" and stage_of[n] <= k < last_use[n]] for k in range(num_stages - 1)
    ]

    segments = []
    for k in range(num_stages):
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        if k > 0:
            for n in crossing[k - 1]:
                keys = _leaf_keys(n, values[n], cuts[k - 1])
                placeholders = [graph.placeholder(f"{n.name}_{i}") for i in range(len(keys))]
                value = values[n]
                if keys == [None]:
                    env[n] = placeholders[0]
                elif isinstance(value, dict):
                    env[n] = graph.call_function(_rebuild_dict, (tuple(keys), *placeholders))
                elif isinstance(value, list):
                    env[n] = graph.call_function(_rebuild_list, tuple(placeholders))
                else:
                    env[n] = graph.call_function(_rebuild_tuple, tuple(placeholders))
        for n in nodes:
            if stage_of[n] != k or (n.op == "placeholder" and k > 0):
                continue
            if n.op == "output":
                graph.node_copy(n, lambda x: env[x])
                continue
            env[n] = graph.node_copy(n, lambda x: env[x])
        if k < num_stages - 1:
            outputs = []
            for n in crossing[k]:
                for key in _leaf_keys(n, values[n], cuts[k]):
                    outputs.append(env[n] if key is None else graph.call_function(operator.getitem, (env[n], key)))
            graph.output(tuple(outputs))
        segment = torch.fx.GraphModule(gm, graph, class_name=f"Segment{k}")
        segment.graph.eliminate_dead_code()
        segment.graph.lint()
        segment.recompile()
        segments.append(segment)
    return segments
