"""Check that a segment can be trained with per-sample gradients, before any step.

Opacus's `ModuleValidator` runs on every segment, not only the first. Its
messages do not name the layer, so each trainable layer is validated on its
own and the message names it by its full-model name.
"""

from __future__ import annotations

import logging

from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn

from homesplit.errors import PrivacyError

__all__ = ["check_segment", "check_segments"]

logger = logging.getLogger(__name__)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check_segment(segment: nn.Module, *, stage: int, fix: bool = False) -> nn.Module:
    """Validate one segment with Opacus's ModuleValidator and return it, fixed if asked.

    Parameters
    ----------
    segment : nn.Module
        The segment, with its full-model layer names.
    stage : int
        Stage index, for the message.
    fix : bool, default False
        Replace what Opacus can replace (BatchNorm becomes GroupNorm) with
        `ModuleValidator.fix`; the replaced layers start from fresh weights.

    Returns
    -------
    nn.Module
        `segment` itself, or a fixed copy when `fix` is true and something changed.

    Raises
    ------
    PrivacyError
        If a layer is unsupported. The message names every such layer, and for
        BatchNorm it suggests GroupNorm.
    """
    if fix:
        problems = _problems(segment)
        if problems:
            segment = ModuleValidator.fix(segment)
            logger.warning("Stage %d: replaced layers %s for differential privacy", stage, [n for n, _ in problems])
    problems = _problems(segment)
    if problems:
        details = "; ".join(f"layer {name!r}: {reason}" for name, reason in problems)
        raise PrivacyError(f"stage {stage} cannot train with differential privacy: {details}")
    return segment


def check_segments(segments: list[nn.Module], *, fix: bool = False) -> list[nn.Module]:
    """Validate every segment of a split model; see `check_segment`.

    Raises
    ------
    PrivacyError
        Naming every unsupported layer of the first stage that has one.
    """
    return [check_segment(segment, stage=k, fix=fix) for k, segment in enumerate(segments)]


def _problems(segment: nn.Module) -> list[tuple[str, str]]:
    problems = []
    for name, layer in segment.named_modules():
        if isinstance(layer, _BATCHNORMS):
            problems.append(
                (
                    name,
                    f"{type(layer).__name__} mixes the samples of a mini-batch, so per-sample gradients do not exist; "
                    "use GroupNorm (or set fix_modules=True to replace it)",
                )
            )
    batchnorm_names = {name for name, _ in problems}
    for name, layer in trainable_modules(segment):
        if name in batchnorm_names:
            continue
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        if validator is not None:
            problems.extend((name, str(error)) for error in validator(layer))
        elif any(True for _ in layer.buffers(recurse=False)):
            problems.append((name, f"{type(layer).__name__} has buffers, which Opacus cannot train privately"))
    return problems
