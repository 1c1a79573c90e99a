"""Device self-benchmark: compute speed relative to a reference, and available memory.

Speed is measured as float32 matrix-multiply throughput, so a device's speed
is its throughput divided by that of the device that profiled the layers
(`ModelProfile.reference_flops_per_second`).

NOTE: matrix-multiply throughput is a proxy for training speed. Layers whose
time is dominated by memory bandwidth or small kernels (normalisation,
attention on short sequences) can scale differently between devices.
"""

from __future__ import annotations

import logging
import time

import psutil
import torch

from homesplit.errors import ConfigError
from homesplit.planner.profiles import DeviceProfile

__all__ = ["measure_matmul_flops", "available_memory_bytes", "benchmark_device"]

logger = logging.getLogger(__name__)


def measure_matmul_flops(*, size: int = 256, min_seconds: float = 0.2) -> float:
    """Measure float32 matrix-multiply throughput on this machine's CPU.

    Parameters
    ----------
    size : int, default 256
        Side of the square matrices.
    min_seconds : float, default 0.2
        Minimum measuring time, in seconds, after one warm-up product.

    Returns
    -------
    float
        Floating-point operations per second, counting ``2 * size**3`` per product.
    """
    if size < 1:
        raise ConfigError(f"size={size} must be at least 1")
    if not min_seconds > 0:
        raise ConfigError(f"min_seconds={min_seconds} must be positive")
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator)
    right = torch.randn(size, size, generator=generator)
    torch.mm(left, right)

    products = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < min_seconds:
        torch.mm(left, right)
        products += 1
        elapsed = time.perf_counter() - start
    return 2 * size**3 * products / elapsed


def available_memory_bytes() -> int:
    """Return the memory available to new allocations without swapping, in bytes, as psutil reports it."""
    return int(psutil.virtual_memory().available)


def benchmark_device(
    name: str,
    *,
    reference_flops_per_second: float,
    memory_bytes: int | None = None,
    idle_watts: float | None = None,
    busy_watts: float | None = None,
    size: int = 256,
    min_seconds: float = 0.2,
) -> DeviceProfile:
    """Profile this machine as a household device.

    Parameters
    ----------
    name : str
        Device name.
    reference_flops_per_second : float
        Throughput of the reference device that profiled the layers, from
        `ModelProfile.reference_flops_per_second`.
    memory_bytes : int or None, default None
        Memory the device may use, in bytes; None takes what is available now.
    idle_watts, busy_watts : float or None, default None
        Power figures from the node config, in watts; they are not measured.
    size, min_seconds
        Passed to `measure_matmul_flops`.
    """
    if not reference_flops_per_second > 0:
        raise ConfigError(f"reference_flops_per_second={reference_flops_per_second!r} must be positive")
    flops = measure_matmul_flops(size=size, min_seconds=min_seconds)
    memory = available_memory_bytes() if memory_bytes is None else memory_bytes
    speed = flops / reference_flops_per_second
    logger.info("device %s: %.3g FLOP/s (speed %.3g), %d bytes of memory", name, flops, speed, memory)
    return DeviceProfile(
        name=name, speed=speed, memory_bytes=memory, idle_watts=idle_watts, busy_watts=busy_watts
    )
