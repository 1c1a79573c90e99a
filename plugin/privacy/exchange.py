"""Sum a tensor over the stages of a pipeline through its household links.

The sum runs up the chain and the total comes back down. The last stage sends
its values upstream as a NORMS frame, and every stage adds its own and passes
the partial sum on. Stage 0 then sends the total back downstream, so every
stage ends with the same tensor, added in the same order.

The runtime calls this between a step's last backward and its optimizer step,
or after the last step of a round. At both points no other frame of the step
is in flight on either link: upstream, the last GRADIENT frame of the step was
already read; downstream, STEP or ACTIVATION frames of the next step are sent
only after the total has gone down.
"""

from __future__ import annotations

from typing import Protocol

import torch

from homesplit.errors import ScheduleError
from homesplit.link import Link
from homesplit.wire import Frame, FrameKind

__all__ = ["StageLinks", "sum_over_stages", "TAG_SAMPLE_NORMS", "TAG_UPDATE_NORM"]

TAG_SAMPLE_NORMS = 0
"""Micro-batch field of NORMS frames with per-sample squared gradient norms."""
TAG_UPDATE_NORM = 1
"""Micro-batch field of NORMS frames with the squared norm of a round update."""


class StageLinks(Protocol):
    """Index, round and links of a stage, as `homesplit.stage.StageRunner` has them."""

    stage: int
    round: int
    upstream: Link | None
    downstream: Link | None


def sum_over_stages(stage: StageLinks, values: torch.Tensor, *, step: int, tag: int = TAG_SAMPLE_NORMS) -> torch.Tensor:
    """Return the element-wise sum of `values` over all stages; every stage gets the same result.

    Parameters
    ----------
    stage : StageLinks
        This stage's index, round and links.
    values : torch.Tensor
        This stage's share, a 1-D tensor of the same length on every stage.
    step : int
        Step index put into the frames and checked on receipt.
    tag : int, default TAG_SAMPLE_NORMS
        Micro-batch field of the frames, so different exchanges cannot be mixed up.

    Raises
    ------
    ScheduleError
        If a neighbour sends a frame of another kind, step or length.
    LinkError
        If a link fails or a neighbour stays silent past the link's deadline.
    """
    total = values
    if stage.downstream is not None:
        total = values + _expect_norms(stage, stage.downstream, values, step=step, tag=tag)
    if stage.upstream is not None:
        stage.upstream.send(Frame(FrameKind.NORMS, total.contiguous(), round=stage.round, step=step, microbatch=tag))
        total = _expect_norms(stage, stage.upstream, values, step=step, tag=tag)
    if stage.downstream is not None:
        stage.downstream.send(Frame(FrameKind.NORMS, total.contiguous(), round=stage.round, step=step, microbatch=tag))
    return total


def _expect_norms(stage: StageLinks, link: Link, like: torch.Tensor, *, step: int, tag: int) -> torch.Tensor:
    frame = link.recv()
    got = (frame.kind, frame.round, frame.step, frame.microbatch)
    want = (FrameKind.NORMS, stage.round, step, tag)
    if got != want or frame.tensor.shape != like.shape or frame.tensor.dtype != like.dtype:
        raise ScheduleError(
            f"stage {stage.stage} expected NORMS round {stage.round} step {step} tag {tag} with shape "
            f"{list(like.shape)} {like.dtype} from {link.peer}, but got {frame.kind.name} round {frame.round} "
            f"step {frame.step} tag {frame.microbatch} with shape {list(frame.tensor.shape)} {frame.tensor.dtype}"
        )
    # The payload buffer belongs to the link; copy before adding in place elsewhere.
    return frame.tensor.clone()
