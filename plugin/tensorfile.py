"""Named tensors in a file, in the wire format and without pickle.

A file is the magic ``b"HSTF"``, then records of (UTF-8 name length as a
little-endian uint32, name, frame header, payload). It is how processes on one
machine hand weights to each other: a parent to its stage processes, and the
stages back to the parent.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from homesplit.errors import FrameError
from homesplit.wire import (
    HEADER,
    Frame,
    FrameKind,
    FrameLimits,
    decode_fixed_header,
    decode_shape,
    encode_header,
    tensor_from_payload,
    tensor_payload,
)

__all__ = ["save_tensors", "load_tensors"]

_MAGIC = b"HSTF"
_NAME = struct.Struct("<I")
_MAX_NAME = 4096


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write `tensors` to `path` atomically (a temporary file, then a rename)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_MAGIC)
            for name, tensor in tensors.items():
                encoded = name.encode("utf-8")
                out.write(_NAME.pack(len(encoded)))
                out.write(encoded)
                frame = Frame(FrameKind.ACTIVATION, tensor.detach().cpu())
                out.write(encode_header(frame))
                out.write(tensor_payload(frame.tensor))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike, *, limits: FrameLimits | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by `save_tensors`.

    Raises
    ------
    FrameError
        If the file is not a tensor file or is truncated.
    """
    limits = limits or FrameLimits(max_payload_bytes=2**40)
    source = str(path)
    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != _MAGIC:
        raise FrameError(f"{source} is not a homesplit tensor file (magic {bytes(data[:4])!r})")
    offset = 4
    tensors: dict[str, torch.Tensor] = {}

    def take(size: int) -> memoryview:
        nonlocal offset
        if offset + size > len(data):
            raise FrameError(f"{source} is truncated at byte {offset}; write it again")
        chunk = data[offset : offset + size]
        offset += size
        return chunk

    while offset < len(data):
        (length,) = _NAME.unpack(take(_NAME.size))
        if length > _MAX_NAME:
            raise FrameError(f"{source} has a tensor name of {length} bytes at byte {offset}; the file is corrupt")
        try:
            name = bytes(take(length)).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(f"{source} has a tensor name that is not UTF-8 before byte {offset}; the file is corrupt") from None
        if name in tensors:
            raise FrameError(f"{source} contains tensor {name!r} twice; the file is corrupt")
        header = decode_fixed_header(take(HEADER.size), limits, peer=source)
        header = decode_shape(header, take(8 * header.ndim), peer=source)
        payload = bytearray(take(header.payload_bytes))
        tensors[name] = tensor_from_payload(header, payload)
    return tensors
