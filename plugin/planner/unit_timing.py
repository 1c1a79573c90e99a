"""Time a model's units at several micro-batch sizes.

The times are taken in this process, with glibc's default allocator, as
stage processes run by default. A stage started with
``--return-freed-memory`` (node config ``return-freed-memory``) maps every
tensor of 128 KiB or more fresh and pays its page faults, which these times
do not include. This was measured on the planner benchmark's transformer
(width 64, 4 blocks, 32 tokens, one torch thread, a 2-core AMD EPYC
container). There the setting made a forward plus backward pass take 1.4 ms
of CPU per sample at micro-batches of 16 instead of 0.84 ms, and made no
difference at 4 samples.

NOTE: the units timed one by one still miss part of how a stage's time
changes with the micro-batch size. For that transformer, a one-stage
pipeline took 1.3 times the profile's prediction at micro-batches of 16 but
0.7 to 0.9 times at 8 (benchmarks/planner.py, calibration factors), and the
cause is not known.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from homesplit.partition import flatten_value, split_model

__all__ = ["time_units", "forward_backward", "restoring_state"]

logger = logging.getLogger(__name__)


def time_units(
    model: nn.Module,
    example_inputs: tuple,
    cuts: Sequence[str],
    *,
    microbatch_sizes: Sequence[int],
    repeats: int,
    leaf_modules: Sequence[type] = (),
) -> list[dict[int, float]]:
    """Time every unit between consecutive cuts at every micro-batch size.

    Parameters
    ----------
    model : nn.Module
        The full model with real weights, in training mode. Its parameters,
        buffers and gradients are the same afterwards.
    example_inputs : tuple
        Inputs of one mini-batch, batch dimension first; a micro-batch of
        ``b`` samples is their first ``b`` samples.
    cuts : sequence of str
        Candidate cuts in execution order, as `split_model` takes them.
    microbatch_sizes : sequence of int
        Micro-batch sizes in samples, each at most the batch size.
    repeats : int
        Rounds of timed passes, after one untimed pass per unit and size. In
        each round every unit runs once per size, or ``B // (4 * b)`` times
        for a size ``b`` below a quarter of the batch ``B``, so that every
        size times about as many samples.
    leaf_modules : sequence of type, default ()
        Passed to `split_model`.

    Returns
    -------
    list of dict of int to float
        Per unit, the median forward plus backward seconds per sample by
        micro-batch size, with the torch thread count of this process. With
        one thread the seconds are the process's CPU time, otherwise wall
        time. The sizes take turns in each of `repeats` rounds. A size
        at which the model raises (BatchNorm in training mode rejects a
        single sample, for example) is left out, with a WARNING.
    """
    timings = _time_here(
        model, tuple(example_inputs), list(cuts), tuple(leaf_modules), list(microbatch_sizes), repeats, torch.get_num_threads()
    )
    _warn_missing_sizes(model, timings, microbatch_sizes)
    return timings


def _warn_missing_sizes(model: nn.Module, timings: list[dict[int, float]], sizes: Sequence[int]) -> None:
    missing = sorted(set(sizes) - set(timings[0])) if timings else []
    if missing:
        # NOTE: the planner still considers these sizes, with the nearest measured size's time.
        logger.warning(
            "%s raised at micro-batches of %s samples, so their times are left out of the profile; a stage "
            "would raise at that size too",
            type(model).__name__, missing,
        )  # fmt: skip


@contextlib.contextmanager
def restoring_state(model: nn.Module) -> Iterator[None]:
    """Put back the model's buffers and gradients on exit."""
    # Training-mode forwards update running statistics such as BatchNorm's.
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        for name, parameter in model.named_parameters():
            parameter.grad = grads[name]


def forward_backward(segment: nn.Module, args: tuple, inputs_need_grad: bool) -> Any:
    """Run one forward and backward pass as a training stage would; return the output."""
    leaves, spec = pytree.tree_flatten(args)
    fresh = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach()
            # A stage after the first sends its input gradient upstream, so it pays for computing it.
            if inputs_need_grad and leaf.is_floating_point():
                leaf.requires_grad_(True)
        fresh.append(leaf)
    output = segment(*pytree.tree_unflatten(fresh, spec))

    # A random gradient of the output's shape costs what the real one would.
    outputs = [t for t in flatten_value(output) if t.requires_grad]
    if outputs:
        torch.autograd.backward(outputs, [torch.randn_like(t) for t in outputs])
    for parameter in segment.parameters():
        parameter.grad = None
    return output


def _time_here(
    model: nn.Module,
    example_inputs: tuple,
    cuts: list[str],
    leaf_modules: tuple[type, ...],
    sizes: list[int],
    repeats: int,
    threads: int,
) -> list[dict[int, float]]:
    """Time every unit at every micro-batch size in this process; return seconds per sample by size."""
    batch_size = int(flatten_value(example_inputs)[0].shape[0])
    # With one thread, the process's CPU time is the pass's own work, page
    # faults included, and load from other processes does not inflate it.
    clock = time.process_time if threads == 1 else time.perf_counter
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with restoring_state(model):
            split = split_model(model, cuts, example_inputs=example_inputs, leaf_modules=leaf_modules)
            inputs = {}
            for size in sizes:
                try:
                    inputs[size] = _unit_inputs(split, example_inputs, size)
                except (RuntimeError, ValueError):
                    continue
            units = range(len(split.segments))
            seconds: dict[tuple[int, int], list[float]] = {(k, size): [] for k in units for size in inputs}
            # The sizes take turns in every round, so a change of load affects them alike.
            for _ in range(repeats):
                for size, unit_inputs in inputs.items():
                    for _ in range(max(1, batch_size // (4 * size))):
                        for k, segment in enumerate(split.segments):
                            start = clock()
                            forward_backward(segment, unit_inputs[k], k > 0)
                            seconds[(k, size)].append(clock() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return [{size: statistics.median(seconds[(k, size)]) / size for size in inputs} for k in units]


def _unit_inputs(split: Any, example_inputs: tuple, size: int) -> list[tuple]:
    """Return every unit's inputs for a micro-batch of the first `size` samples, after one untimed pass each."""
    args = pytree.tree_map(
        lambda leaf: leaf[:size] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else leaf, example_inputs
    )
    inputs = []
    for k, segment in enumerate(split.segments):
        inputs.append(args)
        output = forward_backward(segment, args, k > 0)
        if k < len(split.segments) - 1:
            detached = [tensor.detach() for tensor in flatten_value(output)]
            args = pytree.tree_unflatten(detached, split.boundaries[k].args_spec)
    return inputs
