"""The stage runtime: one pipeline stage running a schedule over its links.

Every stage runs the same loop. Stage 0, the data owner, starts each
mini-batch with a STEP frame that tells every stage the mini-batch size and
its micro-batch count, so mini-batches may differ in size from step to step
(Poisson sampling) and an empty one is skipped by all stages alike. Targets
travel forward with the activations, and the last stage computes the loss.

Gradients accumulate over the micro-batches of a mini-batch, and every stage
takes one optimizer step per mini-batch. Each micro-batch's loss is scaled by
its share of the mini-batch, ``b_i / B``, so for a loss that averages over
samples the accumulated gradient equals that of the whole mini-batch at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils import _pytree as pytree

from homesplit.errors import ConfigError, HomesplitError, ScheduleError
from homesplit.link import Link
from homesplit.schedule import ActionKind, stage_actions
from homesplit.wire import Frame, FrameKind

__all__ = ["StageRunner", "StepResult", "StageHook", "MODE_TRAIN", "MODE_EVAL", "MODE_FINISH", "split_batch"]

logger = logging.getLogger(__name__)

MODE_TRAIN = 0
MODE_EVAL = 1
MODE_FINISH = 2

LossFn = Callable[[Any, Any], torch.Tensor]


class StageHook(Protocol):
    """Extension point called around each optimizer step, e.g. for differential privacy."""

    def before_step(self, runner: StageRunner, *, batch_size: int, step: int) -> None:
        """Run after the mini-batch's last backward and before the optimizer step.

        For an empty training mini-batch (``batch_size=0``), hooks run and the
        optimizer steps only if a hook's ``steps_on_empty_batch`` attribute is
        true. Otherwise empty mini-batches take no step.
        """


@dataclass
class StepResult:
    """Record of what one stage observed in one mini-batch.

    Attributes
    ----------
    step : int
        Step index within the round.
    batch_size : int
        Samples in the mini-batch.
    microbatches : int
        Micro-batches the mini-batch was split into.
    loss_sum : float or None
        Sum over samples of the loss; known on the last stage only.
    correct : int or None
        Samples whose arg-max prediction equals the target, for
        classification outputs on the last stage; otherwise None.
    seconds : float
        Wall time of the step on this stage.
    """

    step: int
    batch_size: int
    microbatches: int
    loss_sum: float | None = None
    correct: int | None = None
    seconds: float = 0.0


def split_batch(value: Any, batch_size: int, num_microbatches: int) -> list[Any]:
    """Split every tensor in `value` along dim 0 into micro-batches of ``ceil(B / M)``.

    The last micro-batch may be smaller, and fewer than `num_microbatches`
    come back when ``B`` is small (never an empty one).
    """
    size = math.ceil(batch_size / num_microbatches)
    leaves, spec = pytree.tree_flatten(value)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != batch_size:
            raise ConfigError(
                f"every input and target must be a tensor with the batch in dim 0 (size {batch_size}); got "
                f"{type(leaf).__name__} with shape {getattr(leaf, 'shape', None)}"
            )
    chunks = [torch.split(leaf, size) for leaf in leaves]
    count = len(chunks[0]) if chunks else 0
    return [pytree.tree_unflatten([c[i] for c in chunks], spec) for i in range(count)]


@dataclass
class _InFlight:
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None


class StageRunner:
    """Run one segment of a pipeline as one stage.

    Parameters
    ----------
    segment : nn.Module
        This stage's segment, as produced by `homesplit.partition.split_model`.
    stage : int
        Stage index; 0 is the data owner, ``num_stages - 1`` computes the loss.
    num_stages : int
        Number of stages in the pipeline.
    args_spec : pytree.TreeSpec or None
        Structure of this segment's arguments (``SplitModel.boundaries[stage - 1].args_spec``);
        None for stage 0.
    upstream, downstream : Link or None
        Links to the previous and next stage; None at the ends.
    optimizer : torch.optim.Optimizer or None
        Optimizer over this segment's parameters; None for evaluation only.
    schedule : {"gpipe", "1f1b"}, default "1f1b"
        Order of forward and backward passes.
    loss_fn : callable, optional
        ``loss_fn(output, target) -> scalar`` averaging over samples; required
        on the last stage.
    round : int, default 0
        Federated round, checked on every received frame.
    hooks : list of StageHook, optional
        Called before every optimizer step.
    """

    def __init__(
        self,
        segment: nn.Module,
        *,
        stage: int,
        num_stages: int,
        args_spec: Any = None,
        upstream: Link | None = None,
        downstream: Link | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        schedule: str = "1f1b",
        loss_fn: LossFn | None = None,
        round: int = 0,
        hooks: Iterable[StageHook] = (),
    ) -> None:
        if not 0 <= stage < num_stages:
            raise ConfigError(f"stage={stage} must be in 0..{num_stages - 1}")
        self.is_first = stage == 0
        self.is_last = stage == num_stages - 1
        if (upstream is None) != self.is_first:
            raise ConfigError(f"stage {stage} of {num_stages} needs an upstream link exactly when it is not stage 0")
        if (downstream is None) != self.is_last:
            raise ConfigError(f"stage {stage} of {num_stages} needs a downstream link exactly when it is not the last stage")
        if self.is_last and loss_fn is None:
            raise ConfigError("the last stage computes the loss, so loss_fn is required there")
        if not self.is_first and args_spec is None:
            raise ConfigError(f"stage {stage} needs the args_spec of the boundary before it")
        stage_actions(schedule, stage=stage, num_stages=num_stages, num_microbatches=1)  # validates the name
        self.segment = segment
        self.stage = stage
        self.num_stages = num_stages
        self.args_spec = args_spec
        self.upstream = upstream
        self.downstream = downstream
        self.optimizer = optimizer
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.round = round
        self.hooks = list(hooks)
        self.steps_taken = 0
        self._step = 0
        self._batch_size = 0

    # -- data owner -----------------------------------------------------------

    def train_step(self, inputs: Any, targets: Any, *, num_microbatches: int) -> StepResult:
        """Train on one mini-batch; call on stage 0 only.

        Parameters
        ----------
        inputs : tensor or tuple of tensors
            The model's positional inputs, batch in dim 0.
        targets : tensor or pytree of tensors
            Targets for `loss_fn`, batch in dim 0.
        num_microbatches : int
            Requested micro-batch count M; fewer are used when the batch has
            fewer than M samples.
        """
        return self._lead_step(inputs, targets, num_microbatches, MODE_TRAIN)

    def eval_step(self, inputs: Any, targets: Any, *, num_microbatches: int) -> StepResult:
        """Evaluate one mini-batch forward only; call on stage 0 only."""
        return self._lead_step(inputs, targets, num_microbatches, MODE_EVAL)

    def finish(self) -> None:
        """Tell every downstream stage that the round is over; call on stage 0 only."""
        self._require_first("finish")
        if self.downstream is not None:
            self.downstream.send(self._frame(FrameKind.STEP, torch.tensor([0, 0, MODE_FINISH]), microbatch=0))

    def _lead_step(self, inputs: Any, targets: Any, num_microbatches: int, mode: int) -> StepResult:
        self._require_first("train_step/eval_step")
        if num_microbatches < 1:
            raise ConfigError(f"num_microbatches={num_microbatches} must be at least 1")
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        leaves = pytree.tree_leaves(args)
        batch_size = int(leaves[0].shape[0]) if leaves and leaves[0].dim() > 0 else 0
        if batch_size:
            input_chunks = split_batch(args, batch_size, num_microbatches)
            target_chunks = split_batch(targets, batch_size, num_microbatches)
        else:
            input_chunks, target_chunks = [], []
        header = torch.tensor([batch_size, len(input_chunks), mode])
        if self.downstream is not None:
            self.downstream.send(self._frame(FrameKind.STEP, header, microbatch=0))
        return self._run_step(batch_size, len(input_chunks), mode, input_chunks, target_chunks)

    # -- other stages ---------------------------------------------------------

    def serve(self) -> list[StepResult]:
        """Run mini-batches as stage 0 announces them until it finishes; not for stage 0."""
        if self.is_first:
            raise ConfigError("stage 0 drives the pipeline with train_step and eval_step; serve() is for the others")
        results = []
        while True:
            frame = self._expect(self.upstream, FrameKind.STEP, microbatch=0, part=0)
            batch_size, count, mode = (int(v) for v in frame.tensor.tolist())
            if self.downstream is not None:
                self.downstream.send(frame)
            if mode == MODE_FINISH:
                return results
            if mode not in (MODE_TRAIN, MODE_EVAL) or batch_size < 0 or count > max(batch_size, 0):
                raise ScheduleError(f"stage {self.stage} got an invalid STEP header {frame.tensor.tolist()} from {self.upstream.peer}")
            results.append(self._run_step(batch_size, count, mode, None, None))

    # -- the step -------------------------------------------------------------

    def _run_step(self, batch_size: int, count: int, mode: int, input_chunks, target_chunks) -> StepResult:
        start = time.perf_counter()
        step = self._step
        self._step += 1
        self._batch_size = batch_size
        result = StepResult(step=step, batch_size=batch_size, microbatches=count)
        if batch_size == 0:
            logger.debug("Stage %d skips empty mini-batch %d", self.stage, step)
            if mode == MODE_TRAIN and any(getattr(hook, "steps_on_empty_batch", False) for hook in self.hooks):
                # DP-SGD under Poisson sampling counts an empty mini-batch as a step of noise alone.
                self._optimizer_step(batch_size, step)
            return result
        training = mode == MODE_TRAIN
        if training and self.optimizer is None and self._has_parameters():
            raise ConfigError(f"stage {self.stage} was asked to train but has no optimizer")
        self.segment.train(training)
        actions = stage_actions(
            self.schedule, stage=self.stage, num_stages=self.num_stages, num_microbatches=count, forward_only=not training
        )
        in_flight: dict[int, _InFlight] = {}
        loss_sum = 0.0
        correct: int | None = 0
        for action in actions:
            m = action.microbatch
            if action.kind is ActionKind.FORWARD:
                with torch.set_grad_enabled(training):
                    state, loss, hits = self._forward(step, m, batch_size, input_chunks, target_chunks)
                if loss is not None:
                    loss_sum += float(loss.detach()) * batch_size
                if hits is None or correct is None:
                    correct = None
                else:
                    correct += hits
                if training:
                    in_flight[m] = state
            else:
                self._backward(step, m, in_flight.pop(m))
        if training:
            self._optimizer_step(batch_size, step)
        if self.is_last:
            result.loss_sum = loss_sum
            result.correct = correct
        result.seconds = time.perf_counter() - start
        return result

    def _optimizer_step(self, batch_size: int, step: int) -> None:
        if self.optimizer is None and self._has_parameters():
            raise ConfigError(f"stage {self.stage} was asked to train but has no optimizer")
        for hook in self.hooks:
            hook.before_step(self, batch_size=batch_size, step=step)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1

    def _has_parameters(self) -> bool:
        return any(True for _ in self.segment.parameters())

    def _forward(self, step: int, m: int, batch_size: int, input_chunks, target_chunks):
        state = _InFlight()
        if self.is_first:
            args = input_chunks[m]
            target = target_chunks[m]
        else:
            tensors = self._receive_parts(self.upstream, FrameKind.ACTIVATION, step, m)
            for t in tensors:
                if t.is_floating_point() and torch.is_grad_enabled():
                    t.requires_grad_(True)
            state.inputs = tensors
            args = pytree.tree_unflatten(tensors, self.args_spec)
            target = None
        output = self.segment(*args)

        if not self.is_last:
            leaves = pytree.tree_leaves(output)
            self._send_parts(self.downstream, FrameKind.ACTIVATION, step, m, leaves)
            if self.is_first:
                target_leaves = pytree.tree_leaves(target)
                self._send_parts(self.downstream, FrameKind.LABEL, step, m, target_leaves)
            else:
                self._relay_labels(step, m)
            state.outputs = leaves
            return state, None, None

        if not self.is_first:
            target = self._receive_labels(step, m)
        share = pytree.tree_leaves(target)[0].shape[0] / batch_size
        loss = self.loss_fn(output, target) * share
        state.loss = loss
        return state, loss, _count_correct(output, target)

    def _backward(self, step: int, m: int, state: _InFlight) -> None:
        if self.is_last:
            state.loss.backward()
        else:
            grads = self._receive_parts(self.downstream, FrameKind.GRADIENT, step, m)
            pairs = [
                (out, grad) for out, grad in zip(state.outputs, grads) if grad.numel() and out.requires_grad
            ]
            if len(grads) != len(state.outputs):
                raise ScheduleError(
                    f"stage {self.stage} sent {len(state.outputs)} tensors in micro-batch {m} of step {step} "
                    f"but got {len(grads)} gradients back from {self.downstream.peer}"
                )
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        if not self.is_first:
            grads_out = [
                t.grad if (t.is_floating_point() and t.grad is not None) else torch.empty(0, dtype=torch.float32)
                for t in state.inputs
            ]
            self._send_parts(self.upstream, FrameKind.GRADIENT, step, m, grads_out)

    # -- frames ---------------------------------------------------------------

    def _frame(self, kind: FrameKind, tensor: torch.Tensor, *, step: int | None = None, microbatch: int, part: int = 0, parts: int = 1) -> Frame:
        return Frame(kind, tensor, round=self.round, step=self._step if step is None else step, microbatch=microbatch, part=part, parts=parts)

    def _send_parts(self, link: Link, kind: FrameKind, step: int, m: int, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            raise ScheduleError(f"stage {self.stage} has no tensor to send as {kind.name} for micro-batch {m}")
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise ScheduleError(f"stage {self.stage} output part {i} is a {type(tensor).__name__}, not a tensor")
            link.send(Frame(kind, tensor.detach(), round=self.round, step=step, microbatch=m, part=i, parts=len(tensors)))

    def _receive_parts(self, link: Link, kind: FrameKind, step: int, m: int) -> list[torch.Tensor]:
        first = self._expect(link, kind, step=step, microbatch=m, part=0)
        tensors = [first.tensor]
        for i in range(1, first.parts):
            tensors.append(self._expect(link, kind, step=step, microbatch=m, part=i, parts=first.parts).tensor)
        return tensors

    def _relay_labels(self, step: int, m: int) -> None:
        first = self._expect(self.upstream, FrameKind.LABEL, step=step, microbatch=m, part=0)
        self.downstream.send(first)
        for i in range(1, first.parts):
            self.downstream.send(self._expect(self.upstream, FrameKind.LABEL, step=step, microbatch=m, part=i, parts=first.parts))

    def _receive_labels(self, step: int, m: int) -> Any:
        tensors = self._receive_parts(self.upstream, FrameKind.LABEL, step, m)
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def _expect(self, link: Link, kind: FrameKind, *, step: int | None = None, microbatch: int, part: int, parts: int | None = None) -> Frame:
        frame = link.recv()
        expected_step = self._step if step is None else step
        got = (frame.kind, frame.round, frame.step, frame.microbatch, frame.part)
        want = (kind, self.round, expected_step, microbatch, part)
        if got != want or (parts is not None and frame.parts != parts):
            raise ScheduleError(
                f"stage {self.stage} expected {kind.name} round {self.round} step {expected_step} micro-batch {microbatch} "
                f"part {part} from {link.peer}, but got {frame.kind.name} round {frame.round} step {frame.step} "
                f"micro-batch {frame.microbatch} part {frame.part}/{frame.parts}"
            )
        return frame

    def _require_first(self, what: str) -> None:
        if not self.is_first:
            raise ConfigError(f"{what} is for stage 0, the data owner; stage {self.stage} calls serve()")

    def close(self, error: BaseException | None = None) -> None:
        """Close both links; on `error`, tell the neighbours why this stage stopped."""
        reason = None if error is None else f"stage {self.stage} failed: {error}"
        for link in (self.upstream, self.downstream):
            if link is not None:
                link.close(reason=reason)


def _count_correct(output: Any, target: Any) -> int | None:
    if (
        isinstance(output, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and output.dim() == 2
        and target.dim() == 1
        and not target.is_floating_point()
    ):
        return int((output.detach().argmax(dim=1) == target).sum())
    return None
