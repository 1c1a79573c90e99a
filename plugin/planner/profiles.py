"""Planner inputs as plain data: layer, model, device and link profiles.

Every type here converts to and from a JSON-compatible dict with ``to_dict`` and
``from_dict``, so a profile can be cached on disk or sent in a Flower
ConfigRecord as a JSON string. Measuring these numbers is the job of
`homesplit.planner.profile` and `homesplit.planner.benchmark`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from homesplit.errors import ConfigError

__all__ = [
    "LayerProfile",
    "ModelProfile",
    "DeviceProfile",
    "LinkProfile",
    "LinkTable",
    "DEFAULT_LINK",
]


@dataclass(frozen=True)
class LayerProfile:
    """Costs of one unit of the model: the layers between two consecutive candidate cuts.

    Parameters
    ----------
    name : str
        Name of the unit, unique within the model; plans list units by this name.
    cut : str or None
        Name of the candidate cut right after this unit, as `split_model` takes
        it, or None for the last unit, which ends at the model's output.
    seconds_per_sample : float
        Forward plus backward time per sample on the reference device, in seconds.
    output_bytes_per_sample : int
        Bytes per sample of the activation that crosses `cut`. The activation
        gradient sent back has the same size.
    parameter_count : int
        Number of parameter elements.
    parameter_bytes : int
        Bytes of the parameters.
    gradient_bytes : int
        Bytes of the parameter gradients (zero for frozen parameters).
    optimizer_bytes : dict of str to int
        Bytes of optimizer state by optimizer kind, for example ``{"sgd": 0,
        "adam": ...}``.
    activation_bytes_per_sample : int
        Bytes per sample that autograd keeps from the forward pass until the
        backward pass of the same micro-batch.
    largest_gradient_bytes : int, default 0
        Bytes of the largest trainable parameter, which sizes the temporary
        tensors of gradient accumulation and of the optimizer step (see
        `homesplit.planner.costs`). Profiles cached without it read as 0.
    seconds_per_sample_by_microbatch : dict of int to float, default {}
        Forward plus backward seconds per sample on the reference device, by
        the micro-batch size (samples) they were measured at. The time per
        sample changes with the micro-batch size: small micro-batches pay the
        per-call cost of every operator, and large ones allocate tensors that
        glibc serves with fresh pages. Empty in profiles cached without it, and
        then `seconds_per_sample` stands for every size.
    """

    name: str
    cut: str | None
    seconds_per_sample: float
    output_bytes_per_sample: int
    parameter_count: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: dict[str, int]
    activation_bytes_per_sample: int
    largest_gradient_bytes: int = 0
    seconds_per_sample_by_microbatch: dict[int, float] = field(default_factory=dict)

    def seconds_per_sample_at(self, microbatch_size: int) -> float:
        """Return the forward plus backward seconds per sample at a micro-batch of `microbatch_size` samples.

        A measured size gives its own figure. Between two measured sizes the
        figure is interpolated linearly in the logarithm of the size, and
        outside them the nearest measured size stands for it. Without figures
        by size, `seconds_per_sample` stands for every size.
        """
        measured = self.seconds_per_sample_by_microbatch
        if not measured:
            return self.seconds_per_sample
        if microbatch_size in measured:
            return measured[microbatch_size]
        sizes = sorted(measured)
        if microbatch_size <= sizes[0]:
            return measured[sizes[0]]
        if microbatch_size >= sizes[-1]:
            return measured[sizes[-1]]
        upper = next(size for size in sizes if size > microbatch_size)
        lower = sizes[sizes.index(upper) - 1]
        weight = math.log(microbatch_size / lower) / math.log(upper / lower)
        return measured[lower] + weight * (measured[upper] - measured[lower])

    def scaled(self, factor: float) -> LayerProfile:
        """Return a copy whose times, at every micro-batch size, are multiplied by `factor`."""
        return replace(
            self,
            seconds_per_sample=self.seconds_per_sample * factor,
            seconds_per_sample_by_microbatch={
                size: seconds * factor for size, seconds in self.seconds_per_sample_by_microbatch.items()
            },
        )

    def static_bytes(self, optimizer: str) -> int:
        """Return parameter, gradient and optimizer-state bytes for `optimizer`.

        Raises
        ------
        ConfigError
            If the profile has no optimizer-state figure for `optimizer`.
        """
        if optimizer not in self.optimizer_bytes:
            known = ", ".join(sorted(self.optimizer_bytes)) or "none"
            raise ConfigError(
                f"optimizer={optimizer!r} has no state size in the profile of unit {self.name!r}; "
                f"profiled optimizers: {known}"
            )
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes[optimizer]

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerProfile:
        """Build a profile from the output of `to_dict`."""
        # JSON turns the integer keys of the figures by size into strings.
        by_size = {int(size): float(seconds) for size, seconds in data.get("seconds_per_sample_by_microbatch", {}).items()}
        return cls(
            **{**data, "optimizer_bytes": dict(data["optimizer_bytes"]), "seconds_per_sample_by_microbatch": by_size}
        )


@dataclass(frozen=True)
class ModelProfile:
    """Layer profiles of one model, measured on one reference device.

    Parameters
    ----------
    layers : list of LayerProfile
        One profile per unit, in model order.
    reference_flops_per_second : float
        Matrix-multiply throughput of the device that measured `layers`, in
        floating-point operations per second. A device's speed is its own
        throughput divided by this one.
    batch_shape : list of list of int
        Shapes of the example inputs that were profiled.
    signature : str
        Hash of the model structure, cuts and input shapes; the profile cache key.
    stage_overhead_seconds : float or None, default None
        Seconds the stage runtime spends per micro-batch and stage on the
        reference device apart from the model (splitting, framing, link
        threads, Python), from `homesplit.planner.overhead.measure_stage_overhead`,
        or None if it was not measured.
    """

    layers: list[LayerProfile]
    reference_flops_per_second: float
    batch_shape: list[list[int]]
    signature: str
    stage_overhead_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-compatible dict."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "reference_flops_per_second": self.reference_flops_per_second,
            "batch_shape": [list(shape) for shape in self.batch_shape],
            "signature": self.signature,
            "stage_overhead_seconds": self.stage_overhead_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelProfile:
        """Build a profile from the output of `to_dict`."""
        return cls(
            layers=[LayerProfile.from_dict(layer) for layer in data["layers"]],
            reference_flops_per_second=float(data["reference_flops_per_second"]),
            batch_shape=[list(shape) for shape in data["batch_shape"]],
            signature=str(data["signature"]),
            # Profiles cached before the overhead was measured lack the key.
            stage_overhead_seconds=data.get("stage_overhead_seconds"),
        )


@dataclass(frozen=True)
class DeviceProfile:
    """One household device: its speed, memory and power figures.

    Parameters
    ----------
    name : str
        Device name, unique within the household.
    speed : float
        Compute speed relative to the reference device that measured the layer
        profiles: a unit takes ``seconds_per_sample / speed`` per sample here.
    memory_bytes : int
        Memory the device may use for its segment, in bytes. The planner's
        memory model leaves out the Python and PyTorch runtime and transient
        buffers of the backward pass, so this is what remains after them.
    idle_watts, busy_watts : float or None, default None
        Power draw while waiting and while computing, in watts. The "energy"
        objective needs both on every device.
    """

    name: str
    speed: float
    memory_bytes: int
    idle_watts: float | None = None
    busy_watts: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.speed, (int, float)) and math.isfinite(self.speed) and self.speed > 0):
            raise ConfigError(f"device {self.name!r}: speed={self.speed!r} must be a positive number")
        if self.memory_bytes < 0:
            raise ConfigError(f"device {self.name!r}: memory_bytes={self.memory_bytes} must not be negative")
        for key in ("idle_watts", "busy_watts"):
            watts = getattr(self, key)
            if watts is not None and not watts >= 0:
                raise ConfigError(f"device {self.name!r}: {key}={watts!r} must not be negative")

    @property
    def has_power(self) -> bool:
        """Whether both power figures are known."""
        return self.idle_watts is not None and self.busy_watts is not None

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Build a profile from the output of `to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class LinkProfile:
    """One direction of the network path between two devices.

    Parameters
    ----------
    bandwidth_bytes_per_second : float
        Sustained throughput, in bytes per second.
    latency_seconds : float
        Time until the first byte arrives, in seconds.
    """

    bandwidth_bytes_per_second: float
    latency_seconds: float

    def __post_init__(self) -> None:
        # A measurement decoded from JSON may be Infinity or NaN, which would
        # make every plan across this link cost the same or nothing.
        if not 0 < self.bandwidth_bytes_per_second < math.inf:
            raise ConfigError(f"bandwidth={self.bandwidth_bytes_per_second!r} bytes/s is invalid; allowed: a positive finite number")
        if not 0 <= self.latency_seconds < math.inf:
            raise ConfigError(f"latency={self.latency_seconds!r} s is invalid; allowed: a finite number of at least 0")

    def transfer_seconds(self, num_bytes: float) -> float:
        """Return the time to send `num_bytes` bytes, in seconds."""
        return self.latency_seconds + num_bytes / self.bandwidth_bytes_per_second

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkProfile:
        """Build a profile from the output of `to_dict`."""
        return cls(**data)


# NOTE: a rough figure for a home Wi-Fi path (100 Mbit/s, 2 ms), not a
# measurement; pass measured links wherever they are known.
DEFAULT_LINK = LinkProfile(bandwidth_bytes_per_second=12.5e6, latency_seconds=2e-3)
"""Link assumed between two devices when nothing was measured or configured."""


@dataclass(frozen=True)
class LinkTable:
    """Links between the devices of a household, with a default for pairs not listed.

    Parameters
    ----------
    links : dict of (str, str) to LinkProfile, default empty
        Link from the first device to the second. When only one direction of a
        pair is listed, the other direction is assumed to be the same.
    default : LinkProfile, default DEFAULT_LINK
        Link for pairs listed in neither direction.
    """

    links: dict[tuple[str, str], LinkProfile] = field(default_factory=dict)
    default: LinkProfile = DEFAULT_LINK

    def between(self, source: str, target: str) -> LinkProfile:
        """Return the link that carries data from `source` to `target`."""
        link = self.links.get((source, target))
        if link is None:
            link = self.links.get((target, source), self.default)
        return link

    def to_dict(self) -> dict[str, Any]:
        """Return the table as a JSON-compatible dict."""
        return {
            "links": [
                {"source": source, "target": target, **link.to_dict()}
                for (source, target), link in sorted(self.links.items())
            ],
            "default": self.default.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkTable:
        """Build a table from the output of `to_dict`."""
        links = {}
        for entry in data["links"]:
            entry = dict(entry)
            pair = (entry.pop("source"), entry.pop("target"))
            links[pair] = LinkProfile.from_dict(entry)
        return cls(links=links, default=LinkProfile.from_dict(data["default"]))
