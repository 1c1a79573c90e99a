"""Measure a model's layer profile by running it, and cache the result.

The model is split at every candidate cut with `homesplit.partition.split_model`,
so each unit is exactly what a stage would run. Each unit then runs forward and
backward on the example inputs (or on what the previous unit returned):

- time: the median of several timed forward plus backward passes, divided by
  the samples, at every micro-batch size the planner may choose
  (`LayerProfile.seconds_per_sample_by_microbatch`). The time per sample
  changes with the size, by a factor of two between 4 and 64 samples for a
  small transformer. The passes run in this process, with the allocator that
  stage processes use by default (`homesplit.planner.unit_timing`);
- activation bytes kept for backward: the distinct storages that autograd
  saves during the forward pass (through `torch.autograd.graph.saved_tensors_hooks`),
  leaving out the unit's own parameters and buffers;
- output bytes: the tensors the unit hands across the next cut;
- parameter bytes: the unit's parameters and buffers. Gradient bytes: its
  trainable parameters;
- optimizer state: the size of PyTorch's own state for SGD, SGD with momentum
  and Adam/AdamW. Adam keeps exp_avg, exp_avg_sq and a float32 step per
  parameter tensor.

NOTE: a tensor that one unit returns and the next unit saves for backward
(a ReLU output feeding a Linear, say) is counted in both units. For a stage of
several units, this double count raises the activation estimate.

With ``measure_overhead=True`` the profile also carries the stage runtime's
cost per micro-batch and stage, which `homesplit.planner.overhead` measures
with real stage processes.

Profiles are cached in a JSON file keyed by a hash of the model structure,
the cuts and the input shapes and dtypes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from homesplit.errors import ConfigError
from homesplit.partition import candidate_cuts, flatten_value, split_model
from homesplit.planner.benchmark import measure_matmul_flops
from homesplit.planner.optimize import DEFAULT_MICROBATCH_CANDIDATES
from homesplit.planner.profiles import LayerProfile, ModelProfile
from homesplit.planner.unit_timing import forward_backward, restoring_state, time_units

__all__ = ["profile_model", "model_signature"]

logger = logging.getLogger(__name__)

# Bytes of a float32 scalar: Adam keeps its step count as one per parameter tensor.
_STEP_BYTES = 4


def profile_model(
    model: nn.Module,
    example_inputs: tuple,
    cuts: Sequence[str] | None = None,
    *,
    cache_path: str | Path | None = None,
    repeats: int = 5,
    leaf_modules: Sequence[type] = (),
    measure_overhead: bool = False,
    microbatch_sizes: Sequence[int] | None = None,
) -> ModelProfile:
    """Profile every unit between consecutive cuts of `model` on this machine.

    Parameters
    ----------
    model : nn.Module
        The full model with real (not ``meta``) parameters, in training mode
        as it will train. Its parameters, buffers and gradients are the same
        afterwards.
    example_inputs : tuple
        Positional inputs of one mini-batch; the first dimension of the first
        tensor is the batch size that per-sample figures divide by.
    cuts : sequence of str or None, default None
        Candidate cuts in execution order; None takes `candidate_cuts(model)`.
    cache_path : str or Path or None, default None
        JSON file of cached profiles. A cached profile with the same
        signature is returned without running the model; a new one is added.
    repeats : int, default 5
        Rounds of timed forward plus backward passes, after one untimed pass
        per unit and micro-batch size. A round runs every unit once per size,
        and sizes below a quarter of the batch proportionally more often, so
        that each size times about as many samples.
    leaf_modules : sequence of type, default ()
        Passed to `split_model` and `candidate_cuts`.
    measure_overhead : bool, default False
        Also measure `ModelProfile.stage_overhead_seconds` with
        `measure_stage_overhead`, which starts two stage processes and takes
        some seconds. A cached profile without the figure gets it measured
        and written back. False leaves it None, or as cached.
    microbatch_sizes : sequence of int or None, default None
        Micro-batch sizes, in samples, to time every unit at. None takes
        ``ceil(B / M)`` for every count ``M`` of the planner's
        `DEFAULT_MICROBATCH_CANDIDATES` up to the batch size ``B``, which
        always includes ``B``. Sizes above ``B`` are left out.

    Returns
    -------
    ModelProfile
        One `LayerProfile` per unit and this machine's matrix-multiply throughput.

    Raises
    ------
    ConfigError
        If the model lives on the ``meta`` device, the inputs have no batch
        dimension, `repeats` is below 1, or a micro-batch size is not a
        positive integer.
    PartitionError
        If the model cannot be cut at `cuts`.
    """
    if repeats < 1:
        raise ConfigError(f"repeats={repeats} must be at least 1")
    example_inputs = tuple(example_inputs)
    if any(tensor.is_meta for tensor in model.parameters()):
        raise ConfigError("the model has parameters on the meta device; profile a model with real weights")
    batch_size = _batch_size(example_inputs)
    sizes = _microbatch_sizes(microbatch_sizes, batch_size)
    if cuts is None:
        cuts = candidate_cuts(model, example_inputs=example_inputs, leaf_modules=leaf_modules)
    cuts = list(cuts)

    signature = model_signature(model, example_inputs, cuts)
    cached = _read_cache(cache_path, signature)
    if cached is not None and (cached.stage_overhead_seconds is not None or not measure_overhead):
        logger.debug("profile %s of %s read from %s", signature[:12], type(model).__name__, cache_path)
        return cached
    if cached is not None:
        profile = dataclasses.replace(cached, stage_overhead_seconds=_measure_overhead())
        _write_cache(cache_path, profile)
        return profile

    names = [_first_unit_name(model, cuts), *cuts]
    layers = []
    args: tuple = example_inputs
    # split_model runs the example inputs through the segments as well.
    with restoring_state(model):
        split = split_model(model, cuts, example_inputs=example_inputs, leaf_modules=leaf_modules)
        # The full batch ran through every segment above, so its times exist.
        timings = time_units(
            model, example_inputs, cuts, microbatch_sizes=sizes, repeats=repeats, leaf_modules=leaf_modules,
        )  # fmt: skip
        for k, segment in enumerate(split.segments):
            is_last = k == len(split.segments) - 1
            layer, output = _profile_unit(
                segment,
                args,
                name=names[k],
                cut=None if is_last else cuts[k],
                batch_size=batch_size,
                inputs_need_grad=k > 0,
            )
            layers.append(
                dataclasses.replace(
                    layer, seconds_per_sample=timings[k][batch_size], seconds_per_sample_by_microbatch=timings[k]
                )
            )
            if not is_last:
                args = pytree.tree_unflatten(flatten_value(output), split.boundaries[k].args_spec)

    profile = ModelProfile(
        layers=layers,
        reference_flops_per_second=measure_matmul_flops(),
        batch_shape=[list(tensor.shape) for tensor in flatten_value(example_inputs)],
        signature=signature,
        stage_overhead_seconds=_measure_overhead() if measure_overhead else None,
    )
    _write_cache(cache_path, profile)
    logger.info("profiled %d units of %s", len(layers), type(model).__name__)
    return profile


def model_signature(model: nn.Module, example_inputs: tuple, cuts: Sequence[str]) -> str:
    """Return a hash of the model's structure, the cuts and the inputs' shapes and dtypes.

    The structure is the module tree as `repr` prints it plus every state_dict
    entry's name, shape and dtype, so changing a layer's size or kind changes
    the signature but training the weights does not.
    """
    digest = hashlib.sha256()
    parts: list[Any] = [type(model).__qualname__, repr(model), list(cuts), torch.__version__]
    parts += [(name, list(value.shape), str(value.dtype)) for name, value in model.state_dict().items()]
    parts += [(list(tensor.shape), str(tensor.dtype)) for tensor in flatten_value(tuple(example_inputs))]
    digest.update(json.dumps(parts, default=str).encode())
    return digest.hexdigest()


def _measure_overhead() -> float:
    # Imported here: the stage runtime is only needed when the overhead is measured.
    from homesplit.planner.overhead import measure_stage_overhead

    # The layer times were taken with this thread count, so the stages are expected to run with it too.
    return measure_stage_overhead(threads=torch.get_num_threads())


def _microbatch_sizes(microbatch_sizes: Sequence[int] | None, batch_size: int) -> list[int]:
    """Return the micro-batch sizes to time, in increasing order, always with `batch_size`."""
    if microbatch_sizes is None:
        microbatch_sizes = [-(-batch_size // count) for count in DEFAULT_MICROBATCH_CANDIDATES if count <= batch_size]
    for size in microbatch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"micro-batch size {size!r} must be a positive integer")
    return sorted({*(size for size in microbatch_sizes if size <= batch_size), batch_size})


def _profile_unit(
    segment: nn.Module,
    args: tuple,
    *,
    name: str,
    cut: str | None,
    batch_size: int,
    inputs_need_grad: bool,
) -> tuple[LayerProfile, Any]:
    """Measure one unit's bytes; return its profile, timed later, and its output for the next unit."""
    own_storages = {_storage_key(t) for t in [*segment.parameters(), *segment.buffers()]}
    saved: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in own_storages:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward_backward(segment, args, inputs_need_grad)

    parameters = list(segment.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    state_bytes = sum(_nbytes(t) for t in [*parameters, *segment.buffers()])
    gradient_bytes = sum(_nbytes(p) for p in trainable)
    layer = LayerProfile(
        name=name,
        cut=cut,
        # Set from the timed passes by the caller.
        seconds_per_sample=0.0,
        output_bytes_per_sample=_per_sample(sum(_nbytes(t) for t in flatten_value(output)), batch_size),
        parameter_count=sum(p.numel() for p in parameters),
        parameter_bytes=state_bytes,
        gradient_bytes=gradient_bytes,
        optimizer_bytes={
            "sgd": 0,
            "sgd_momentum": gradient_bytes,
            "adam": 2 * gradient_bytes + _STEP_BYTES * len(trainable),
            "adamw": 2 * gradient_bytes + _STEP_BYTES * len(trainable),
        },
        activation_bytes_per_sample=_per_sample(sum(saved.values()), batch_size),
        largest_gradient_bytes=max((_nbytes(p) for p in trainable), default=0),
    )
    return layer, _detached(output)


def _batch_size(example_inputs: tuple) -> int:
    tensors = flatten_value(example_inputs)
    if not tensors or tensors[0].dim() == 0:
        raise ConfigError("example_inputs must contain a tensor whose first dimension is the batch")
    return int(tensors[0].shape[0])


def _first_unit_name(model: nn.Module, cuts: list[str]) -> str:
    """Name the unit before the first cut by its first module, as candidate_cuts would list it.

    NOTE: this takes the first registered child, which runs first in the models
    homesplit ships. A model that registers its children out of execution
    order gets a misleading name for this unit, but never a wrong split.
    """
    name, module = "", model
    for _ in range(2 if not isinstance(model, nn.Sequential) else 64):
        children = list(module.named_children())
        if not children:
            break
        child_name, module = children[0]
        name = f"{name}.{child_name}" if name else child_name
        if not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            break
    if not name or name in cuts:
        return "input"
    return name


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (storage.data_ptr(), storage.nbytes())


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _per_sample(num_bytes: int, batch_size: int) -> int:
    return -(-num_bytes // batch_size)


def _detached(value: Any) -> Any:
    return pytree.tree_map(lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) else leaf, value)


def _read_cache(cache_path: str | Path | None, signature: str) -> ModelProfile | None:
    if cache_path is None or not Path(cache_path).exists():
        return None
    try:
        entries = json.loads(Path(cache_path).read_text(encoding="utf-8"))
        entry = entries.get(signature)
        return None if entry is None else ModelProfile.from_dict(entry)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        logger.warning("ignoring unreadable profile cache %s: %s", cache_path, error)
        return None


def _write_cache(cache_path: str | Path | None, profile: ModelProfile) -> None:
    if cache_path is None:
        return
    path = Path(cache_path)
    entries: dict[str, Any] = {}
    if path.exists():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            logger.warning("replacing unreadable profile cache %s: %s", path, error)
    if not isinstance(entries, dict):
        entries = {}
    entries[profile.signature] = profile.to_dict()

    # Write and rename, so a reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(entries, file, sort_keys=True)
    os.replace(temporary, path)
