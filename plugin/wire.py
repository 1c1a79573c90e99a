"""Typed frames: the wire format of the household data plane.

A frame is a fixed little-endian header, the tensor's shape, then the tensor's
raw bytes. Nothing is pickled, so a peer can at worst send a wrong tensor, never
code. The decoder checks every header field against `FrameLimits` before the
receiver allocates anything, so a header that claims a huge payload costs the
receiver nothing.

Layout (all integers little-endian)::

    offset size field
    0      4    magic b"HSPL"
    4      1    version (1)
    5      1    kind (FrameKind)
    6      1    dtype code
    7      1    ndim
    8      4    round
    12     4    step
    16     4    micro-batch id
    20     2    part index (a boundary may carry several tensors)
    22     2    part count
    24     8    payload length in bytes
    32     8*n  shape, one unsigned 64-bit integer per dimension
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field

import torch

from homesplit.errors import FrameError

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER",
    "FrameKind",
    "FrameLimits",
    "FrameHeader",
    "Frame",
    "DTYPE_CODES",
    "encode_header",
    "decode_fixed_header",
    "decode_shape",
    "tensor_payload",
    "tensor_from_payload",
]

MAGIC = b"HSPL"
VERSION = 1
HEADER = struct.Struct("<4sBBBBIIIHHQ")
_DIM = struct.Struct("<Q")


class FrameKind(enum.IntEnum):
    """Kind of payload a frame carries; the receiver checks it against the expected kind."""

    HELLO = 1
    """First frame on a connection: UTF-8 JSON naming the sender and channel."""
    STEP = 2
    """Start of a mini-batch: int64 [batch size, micro-batch count, mode]."""
    ACTIVATION = 3
    """One tensor of a micro-batch's activations, sent downstream."""
    GRADIENT = 4
    """Gradient of one activation tensor, sent upstream."""
    LABEL = 5
    """One tensor of a micro-batch's targets, relayed to the last stage."""
    NORMS = 6
    """Per-sample squared gradient norms, exchanged for differential privacy."""
    HEARTBEAT = 7
    """Keeps an idle link alive; carries an empty payload."""
    ABORT = 8
    """The sender stopped on an error; payload is the UTF-8 reason."""
    END = 9
    """The sender finished; no more frames follow on this connection."""
    METRIC = 10
    """Float64 values reported by the last stage back to the data owner."""


# Codes are part of the wire format: never renumber, only append.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
}
_DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class FrameLimits:
    """Bounds that a frame header must respect before anything is allocated.

    Parameters
    ----------
    max_payload_bytes : int, default 2**30
        Largest tensor payload accepted, in bytes (1 GiB by default). Raise it
        for models whose activations per micro-batch are larger.
    max_ndim : int, default 8
        Largest number of tensor dimensions accepted.
    max_parts : int, default 64
        Largest number of tensors one boundary may carry.
    """

    max_payload_bytes: int = 2**30
    max_ndim: int = 8
    max_parts: int = 64

    @property
    def max_header_bytes(self) -> int:
        """Largest header in bytes, shape included."""
        return HEADER.size + _DIM.size * self.max_ndim


@dataclass(frozen=True)
class FrameHeader:
    """A decoded, validated frame header."""

    kind: FrameKind
    dtype: torch.dtype
    round: int
    step: int
    microbatch: int
    part: int
    parts: int
    payload_bytes: int
    ndim: int
    shape: tuple[int, ...] = ()


@dataclass
class Frame:
    """One tensor with the coordinates that say where it belongs.

    Parameters
    ----------
    kind : FrameKind
        What the tensor is.
    tensor : torch.Tensor
        A CPU tensor of a dtype in `DTYPE_CODES`.
    round : int, default 0
        Federated round the frame belongs to.
    step : int, default 0
        Mini-batch (optimizer step) index within the round.
    microbatch : int, default 0
        Micro-batch index within the step.
    part : int, default 0
        Index of the tensor among those that one boundary carries.
    parts : int, default 1
        Number of tensors that the boundary carries.
    """

    kind: FrameKind
    tensor: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    round: int = 0
    step: int = 0
    microbatch: int = 0
    part: int = 0
    parts: int = 1

    @classmethod
    def text(cls, kind: FrameKind, text: str, **coordinates: int) -> Frame:
        """Build a frame whose payload is UTF-8 text (HELLO, ABORT)."""
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
        return cls(kind, data, **coordinates)

    def as_text(self) -> str:
        """Decode a UTF-8 text payload, replacing invalid bytes.

        The payload's raw bytes are decoded whatever dtype the header claims,
        because a peer may send a HELLO or ABORT frame of any dtype, bfloat16
        included, which numpy cannot represent.
        """
        return bytes(tensor_payload(self.tensor)).decode("utf-8", errors="replace")


def encode_header(frame: Frame) -> bytes:
    """Encode the header of `frame`, shape included.

    Raises
    ------
    FrameError
        If the tensor's dtype has no wire code or a coordinate is out of range.
    """
    tensor = frame.tensor
    code = DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise FrameError(
            f"dtype {tensor.dtype} cannot be sent; cast the tensor to one of "
            f"{sorted(str(d) for d in DTYPE_CODES)}"
        )
    payload_bytes = tensor.numel() * tensor.element_size()
    try:
        fixed = HEADER.pack(
            MAGIC,
            VERSION,
            int(frame.kind),
            code,
            tensor.dim(),
            frame.round,
            frame.step,
            frame.microbatch,
            frame.part,
            frame.parts,
            payload_bytes,
        )
    except struct.error as exc:
        raise FrameError(
            f"frame coordinates out of range (round={frame.round}, step={frame.step}, "
            f"microbatch={frame.microbatch}, part={frame.part}/{frame.parts}): {exc}"
        ) from exc
    return fixed + b"".join(_DIM.pack(size) for size in tensor.shape)


def decode_fixed_header(data: bytes | memoryview, limits: FrameLimits, *, peer: str = "peer") -> FrameHeader:
    """Decode and validate the fixed part of a header.

    The returned header has an empty shape; read ``ndim * 8`` more bytes and
    pass them to `decode_shape`.

    Raises
    ------
    FrameError
        If the magic, version, kind, dtype, dimension count, part index or
        payload length is invalid. The message names `peer`.
    """
    if len(data) != HEADER.size:
        raise FrameError(f"frame header from {peer} has {len(data)} bytes, expected {HEADER.size}")
    (magic, version, kind, code, ndim, round_, step, microbatch, part, parts, payload_bytes) = HEADER.unpack(data)
    if magic != MAGIC:
        raise FrameError(f"frame from {peer} starts with {magic!r}, not {MAGIC!r}: the peer does not speak the homesplit wire format")
    if version != VERSION:
        raise FrameError(f"frame from {peer} has wire version {version}, this build speaks {VERSION}: run the same homesplit version on every device")
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise FrameError(f"frame from {peer} has unknown kind {kind}") from None
    dtype = _DTYPES_BY_CODE.get(code)
    if dtype is None:
        raise FrameError(f"frame from {peer} has unknown dtype code {code}")
    if ndim > limits.max_ndim:
        raise FrameError(f"frame header from {peer} announces {ndim} dimensions, the limit is {limits.max_ndim}")
    if parts == 0 or parts > limits.max_parts or part >= parts:
        raise FrameError(f"frame from {peer} has part {part} of {parts}; expected 0 <= part < parts <= {limits.max_parts}")
    if payload_bytes > limits.max_payload_bytes:
        raise FrameError(
            f"frame from {peer} announces a payload of {payload_bytes} bytes, more than "
            f"max_payload_bytes={limits.max_payload_bytes}; raise the limit only if the model really sends tensors that large"
        )
    return FrameHeader(frame_kind, dtype, round_, step, microbatch, part, parts, payload_bytes, ndim)


def decode_shape(header: FrameHeader, data: bytes | memoryview, *, peer: str = "peer") -> FrameHeader:
    """Attach the shape in `data` to `header` and check it against the payload length.

    Raises
    ------
    FrameError
        If the shape does not match the payload length for the dtype.
    """
    if len(data) != _DIM.size * header.ndim:
        raise FrameError(f"frame shape from {peer} has {len(data)} bytes, expected {_DIM.size * header.ndim}")
    shape = tuple(_DIM.unpack_from(data, _DIM.size * i)[0] for i in range(header.ndim))
    # An empty tensor passes the length check whatever its other dimensions
    # are, but torch computes strides from them in int64 and raises on overflow.
    if math.prod(max(size, 1) for size in shape) >= 2**63:
        raise FrameError(f"frame from {peer} has shape {list(shape)}, which torch cannot represent (strides overflow int64)")
    # Python integers do not overflow, so a shape crafted to wrap around a
    # 64-bit product cannot sneak past this comparison.
    expected = math.prod(shape) * torch.empty(0, dtype=header.dtype).element_size()
    if expected != header.payload_bytes:
        raise FrameError(
            f"frame from {peer} has shape {list(shape)} of {header.dtype}, which needs {expected} bytes, "
            f"but announces a payload of {header.payload_bytes} bytes"
        )
    return FrameHeader(
        header.kind,
        header.dtype,
        header.round,
        header.step,
        header.microbatch,
        header.part,
        header.parts,
        header.payload_bytes,
        header.ndim,
        shape,
    )


def tensor_payload(tensor: torch.Tensor) -> memoryview:
    """Return the raw bytes of `tensor` without copying a contiguous CPU tensor."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_from_payload(header: FrameHeader, payload: bytearray) -> torch.Tensor:
    """Wrap a received payload as a tensor of the header's dtype and shape, without copying."""
    if header.payload_bytes == 0:
        return torch.empty(header.shape, dtype=header.dtype)
    raw = torch.frombuffer(payload, dtype=torch.uint8)
    return raw.view(header.dtype).reshape(header.shape)
