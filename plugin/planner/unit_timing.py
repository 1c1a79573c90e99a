"""Time a model's units at several micro-batch sizes, under the stage processes' allocator.

A stage process sets glibc's mmap threshold at 128 KiB before it creates a
tensor (`homesplit.allocator`), so every larger tensor is mapped fresh and
page-faulted in on first use, and unmapped when freed. A process with glibc's
default threshold keeps such tensors on its heap after the first few. The
planner benchmark's transformer (width 64, 4 blocks, 32 tokens) shows the
cost on a 2-core AMD EPYC container at one torch thread. A forward plus backward
pass took 1.4 ms of CPU per sample at micro-batches of 16 with the threshold
set, and 0.84 ms without it. At 4 samples, when few tensors reach 128 KiB,
both took 1.4 ms. `time_units` therefore runs the timed passes in a child
process (``python -m homesplit.planner.unit_timing``) that sets the
threshold first, and the parent's allocator stays as it was.

NOTE: the units timed one by one still miss part of how a stage's time
changes with the micro-batch size. For that transformer, a one-stage
pipeline took 1.3 times the profile's prediction at micro-batches of 16 but
0.7 to 0.9 times at 8 (benchmarks/planner.py, calibration factors), and the
cause is not known.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from homesplit.errors import HomesplitError
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
    stage_allocator: bool = True,
    timeout: float = 900.0,
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
    stage_allocator : bool, default True
        Run the passes in a child process that sets the stage processes' mmap
        threshold. The child gets the model and inputs pickled; a model that
        cannot be pickled is timed in this process, with a WARNING. False
        times in this process, with its own allocator.
    timeout : float, default 900.0
        Seconds the child process may take before it is killed.

    Returns
    -------
    list of dict of int to float
        Per unit, the median forward plus backward seconds per sample by
        micro-batch size, with the torch thread count of this process. With
        one thread the seconds are the process's CPU time, otherwise wall
        time. The sizes take turns in each of `repeats` rounds. A size
        at which the model raises (BatchNorm in training mode rejects a
        single sample, for example) is left out, with a WARNING.

    Raises
    ------
    HomesplitError
        If the child process fails or times out; the message carries its
        last error output.
    """
    arguments = (model, tuple(example_inputs), list(cuts), tuple(leaf_modules), list(microbatch_sizes), repeats)
    if stage_allocator:
        try:
            payload = pickle.dumps((*arguments, torch.get_num_threads()))
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            logger.warning(
                "timing the units of %s in this process with glibc's default mmap threshold, not the stage "
                "processes' one, because the model cannot be pickled for a child process (%s); times of units "
                "with tensors of 128 KiB or more may be predicted short",
                type(model).__name__, error,
            )  # fmt: skip
        else:
            timings = _time_in_child(payload, timeout=timeout)
            _warn_missing_sizes(model, timings, microbatch_sizes)
            return timings
    timings = _time_here(*arguments, torch.get_num_threads())
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


def _time_in_child(payload: bytes, *, timeout: float) -> list[dict[int, float]]:
    """Run `_time_here` on the pickled arguments in ``python -m homesplit.planner.unit_timing``."""
    with tempfile.TemporaryDirectory(prefix="homesplit-unit-timing-") as scratch:
        request, result = Path(scratch) / "request.pickle", Path(scratch) / "result.pickle"
        request.write_bytes(payload)
        command = [sys.executable, "-m", "homesplit.planner.unit_timing", str(request), str(result)]
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as error:
            raise HomesplitError(
                f"timing the model's units took more than {timeout} s; profile a smaller batch"
            ) from error
        if finished.returncode != 0 or not result.exists():
            tail = "\n".join(finished.stderr.strip().splitlines()[-5:])
            raise HomesplitError(f"the unit timing process failed with exit code {finished.returncode}: {tail}")
        return pickle.loads(result.read_bytes())


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


def _main(argv: list[str]) -> int:
    """Time the units of a pickled request with the stage processes' mmap threshold; write the result."""
    # Before any tensor exists, as in the stage processes.
    from homesplit.allocator import pin_mmap_threshold

    pin_mmap_threshold()
    request, result = argv
    timings = _time_here(*pickle.loads(Path(request).read_bytes()))
    Path(result).write_bytes(pickle.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
