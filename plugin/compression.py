"""Optional half-precision activations and gradients on the wire.

`CompressedLink` wraps any `Link`. It sends float32 ACTIVATION and GRADIENT
tensors as float16 or bfloat16, which halves their bytes, and casts them back
to float32 on receipt. The pipeline runtime receives float32 tensors either way,
so it runs unchanged. Compression is off unless a caller wraps its links.

Both ends of a link must be wrapped with the same `wire_dtype`, because the
frame format does not record the dtype a tensor had before it was cast. A
model that itself computes in float16 or bfloat16 must not use this wrapper:
its tensors would come out as float32.

float16 keeps 11 significant bits but overflows above 65504, so a float16 link
sends any tensor with larger values uncompressed. bfloat16 has float32's range
with 8 significant bits.
"""

from __future__ import annotations

import logging

import torch

from homesplit.errors import ConfigError
from homesplit.link import Link
from homesplit.wire import Frame, FrameKind

__all__ = ["CompressedLink"]

logger = logging.getLogger(__name__)

_WIRE_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT16_MAX = torch.finfo(torch.float16).max


class CompressedLink(Link):
    """A `Link` that sends float32 activations and gradients in half precision.

    Parameters
    ----------
    link : Link
        The link to wrap; it carries the compressed frames.
    wire_dtype : torch.dtype, default torch.float16
        ``torch.float16`` or ``torch.bfloat16``.
    kinds : tuple of FrameKind, default (ACTIVATION, GRADIENT)
        Frame kinds to compress. Labels, norms and metrics are never
        compressed by default, because their precision matters more than
        their size.
    """

    def __init__(
        self,
        link: Link,
        *,
        wire_dtype: torch.dtype = torch.float16,
        kinds: tuple[FrameKind, ...] = (FrameKind.ACTIVATION, FrameKind.GRADIENT),
    ) -> None:
        if wire_dtype not in _WIRE_DTYPES:
            raise ConfigError(f"wire_dtype={wire_dtype} is invalid; use torch.float16 or torch.bfloat16")
        self._link = link
        self.peer = link.peer
        self.wire_dtype = wire_dtype
        self.kinds = frozenset(kinds)
        self.uncompressed_frames = 0
        """Frames sent in float32 because their values overflow float16."""

    def send(self, frame: Frame) -> None:
        """Queue `frame`, cast to `wire_dtype` if it is a float32 tensor of a compressed kind."""
        tensor = frame.tensor
        if frame.kind in self.kinds and tensor.dtype == torch.float32 and self._fits(tensor):
            frame = Frame(frame.kind, tensor.to(self.wire_dtype), frame.round, frame.step, frame.microbatch, frame.part, frame.parts)
        self._link.send(frame)

    def recv(self, *, timeout: float | None = None) -> Frame:
        """Return the next frame, cast back to float32 if it arrived in `wire_dtype`."""
        frame = self._link.recv(timeout=timeout)
        if frame.kind in self.kinds and frame.tensor.dtype == self.wire_dtype:
            frame.tensor = frame.tensor.to(torch.float32)
        return frame

    def close(self, *, reason: str | None = None) -> None:
        """Close the wrapped link."""
        self._link.close(reason=reason)

    @property
    def bytes_sent(self) -> int:
        return self._link.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._link.bytes_received

    def _fits(self, tensor: torch.Tensor) -> bool:
        if self.wire_dtype != torch.float16 or tensor.numel() == 0:
            return True
        if tensor.abs().max().item() <= _FLOAT16_MAX:
            return True
        if self.uncompressed_frames == 0:
            logger.warning(
                "Sending a tensor to %s uncompressed because it has NaN or values above float16's maximum %s; "
                "use wire_dtype=torch.bfloat16 to keep compressing such tensors",
                self.peer,
                _FLOAT16_MAX,
            )
        self.uncompressed_frames += 1
        return False
