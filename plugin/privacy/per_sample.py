"""Per-sample gradients of one pipeline segment, paired per micro-batch.

Opacus's `GradSampleModule` (1.6) keeps each layer's forward inputs on a stack
and pops the most recent one at backward, and it sums the per-sample gradients
of forwards that overlap, which is its rule for tied parameters. A pipeline
stage keeps several micro-batches in flight (GPipe runs every forward before
the first backward), so those hooks would pair a backward with the inputs of
another micro-batch. This module registers, at each forward, a tensor hook on
the layer's output that closes over that same forward's inputs, and hands the
pair to Opacus's per-layer grad samplers or, for layers without one, to its
functorch fallback. The gradient that reaches a layer's output is whatever the
stage's backward sends, so the external backward of a middle stage works too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from torch import nn
from torch.utils import _pytree as pytree

from homesplit.errors import PrivacyError

__all__ = ["PerSampleGradients", "trainable_layers"]

logger = logging.getLogger(__name__)


def _owns_trainable_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def trainable_layers(segment: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, layer)`` for every layer whose per-sample gradient is computed directly.

    A layer that owns trainable parameters and has an Opacus grad sampler is
    yielded and its children are visited too. A layer that owns parameters but
    has no grad sampler is yielded as a whole and handled by functorch, so its
    children are not visited. Opacus's `GradSampleHooks` follows the same rule.
    """
    if _owns_trainable_parameters(segment):
        yield prefix, segment
        if type(segment) not in GradSampleModule.GRAD_SAMPLERS:
            return
    for name, child in segment.named_children():
        yield from trainable_layers(child, f"{prefix}.{name}" if prefix else name)


class PerSampleGradients:
    """Collect per-sample gradients of a segment's parameters over the micro-batches of a step.

    Parameters
    ----------
    segment : nn.Module
        The stage's segment; layers are hooked in place, names stay unchanged.

    Raises
    ------
    PrivacyError
        If a trainable parameter belongs to no layer that can be hooked.

    Notes
    -----
    Micro-batch ``m`` is the ``m``-th training forward of the segment since the
    last `take`. The pipeline schedules run forwards in micro-batch order on
    every stage, so the sample order is the same on every stage. The
    gradients are those of the loss the stage back-propagates, whatever its
    scaling; the caller rescales.
    """

    def __init__(self, segment: nn.Module) -> None:
        self.parameters = [p for p in segment.parameters() if p.requires_grad]
        self._index = {id(p): i for i, p in enumerate(self.parameters)}
        self._handles = []
        self._sizes: list[int] = []
        self._grads: list[dict[int, torch.Tensor]] = [{} for _ in self.parameters]

        covered: set[int] = set()
        for name, layer in trainable_layers(segment):
            if type(layer) not in GradSampleModule.GRAD_SAMPLERS:
                # functorch re-runs the layer per sample; prepare it once here.
                try:
                    prepare_layer(layer)
                except NotImplementedError as exc:
                    raise PrivacyError(f"layer {name!r} ({type(layer).__name__}) has no per-sample gradient: {exc}") from exc
                logger.debug("Layer %s (%s) uses the functorch fallback", name, type(layer).__name__)
                owned = layer.parameters(recurse=True)
            else:
                owned = layer.parameters(recurse=False)
            covered.update(id(p) for p in owned if p.requires_grad)
            self._handles.append(layer.register_forward_hook(partial(self._on_forward, name)))
        names = {id(p): n for n, p in segment.named_parameters()}
        uncovered = [names.get(id(p), "?") for p in self.parameters if id(p) not in covered]
        if uncovered:
            raise PrivacyError(f"parameters {uncovered} belong to no layer with a per-sample gradient; wrap them in a module")
        self._handles.append(segment.register_forward_pre_hook(self._on_segment_forward))

    def _on_segment_forward(self, segment: nn.Module, args: tuple) -> None:
        if not (segment.training and torch.is_grad_enabled()):
            return
        leaves = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.dim() > 0]
        self._sizes.append(int(leaves[0].shape[0]) if leaves else 0)

    def _on_forward(self, name: str, layer: nn.Module, inputs: tuple, output: object) -> None:
        if not (layer.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, torch.Tensor):
            raise PrivacyError(
                f"layer {name!r} ({type(layer).__name__}) returns a {type(output).__name__}; per-sample gradients "
                "need layers with one tensor output (replace e.g. nn.MultiheadAttention with opacus.layers.DPMultiheadAttention)"
            )
        if not output.requires_grad:
            return
        activations = [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs]
        microbatch = len(self._sizes) - 1
        output.register_hook(partial(self._on_backward, layer, activations, microbatch))

    def _on_backward(self, layer: nn.Module, activations: list, microbatch: int, grad: torch.Tensor) -> None:
        sampler = GradSampleModule.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)
        for param, grad_sample in sampler(layer, activations, grad.detach()).items():
            index = self._index.get(id(param))
            if index is None:
                continue
            stored = self._grads[index]
            # A layer called twice in one forward (tied weights) adds up per sample.
            stored[microbatch] = stored[microbatch] + grad_sample if microbatch in stored else grad_sample

    def take(self) -> list[list[torch.Tensor]]:
        """Return, per parameter, one ``[b_m, *param.shape]`` tensor per micro-batch, and start a new step.

        Micro-batches are in order, so concatenating gives the samples in
        mini-batch order. A parameter that got no gradient in a micro-batch
        contributes zeros for its samples.
        """
        result = []
        for param, stored in zip(self.parameters, self._grads):
            parts = []
            for microbatch, size in enumerate(self._sizes):
                grad_sample = stored.get(microbatch)
                if grad_sample is None:
                    grad_sample = torch.zeros((size, *param.shape), dtype=param.dtype)
                parts.append(grad_sample)
            result.append(parts)
        self.reset()
        return result

    def reset(self) -> None:
        """Drop everything collected since the last `take`."""
        self._sizes = []
        self._grads = [{} for _ in self.parameters]

    def remove(self) -> None:
        """Remove every hook from the segment."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
