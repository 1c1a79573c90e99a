"""A pipeline training job as plain data, and the factories it names.

A `PipelineJob` is everything a stage process needs besides its links and its
initial weights: which model to build, where to cut it, how to train it. It is
JSON, so it crosses process and device boundaries without pickle, and every
code reference in it is an importable ``module:function`` string.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from homesplit.errors import ConfigError
from homesplit.json_limits import loads_limited
from homesplit.partition import SplitModel, split_model
from homesplit.schedule import SCHEDULES

__all__ = [
    "PipelineJob",
    "load_callable",
    "build_optimizer",
    "check_optimizer",
    "optimizer_class",
    "OPTIMIZERS",
    "build_loss",
    "build_split",
    "DTYPES",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}


def load_callable(reference: str) -> Callable[..., Any]:
    """Import ``module:attribute`` and return the attribute.

    Raises
    ------
    ConfigError
        If the reference is malformed, the module cannot be imported, or the
        attribute is missing or not callable.
    """
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{reference!r} is not a 'module:function' reference, e.g. 'homesplit.models:mlp'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} from {reference!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r} (from {reference!r})")
    if not callable(target):
        raise ConfigError(f"{reference!r} is not callable")
    return target


@dataclass
class PipelineJob:
    """Everything that defines a pipeline training run, as JSON-friendly data.

    Parameters
    ----------
    model : str
        ``module:function`` that builds the full model; called with `model_kwargs`.
    example_shape : list of int
        Shape of one example input (batch dimension included, usually 1).
    example_dtype : str, default "float32"
        Dtype of the example input, a key of `DTYPES`.
    cuts : list of str
        Where to cut the model; ``len(cuts) + 1`` stages.
    data : str
        ``module:function`` returning an iterable of ``(inputs, targets)``
        mini-batches; called with `data_kwargs` on stage 0 only.
    schedule : {"gpipe", "1f1b"}, default "1f1b"
    num_microbatches : int, default 4
    optimizer : dict, default SGD with lr 0.1
        ``{"name": <torch.optim class name>, **kwargs}``.
    loss : str, default "cross_entropy"
        ``"cross_entropy"``, ``"mse"`` or a ``module:function`` reference.
    max_steps : int or None, default None
        Stop after this many mini-batches even if the data goes on.
    devices : list of str, optional
        Device name per stage; defaults to ``stage0``, ``stage1``, ...
    privacy : dict, optional
        Differential privacy settings, the keys of
        `homesplit.privacy.PrivacyConfig`; None (the default) trains without DP.
    """

    model: str
    example_shape: list[int]
    cuts: list[str]
    data: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    example_dtype: str = "float32"
    schedule: str = "1f1b"
    num_microbatches: int = 4
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "SGD", "lr": 0.1})
    loss: str = "cross_entropy"
    max_steps: int | None = None
    devices: list[str] = field(default_factory=list)
    household: str = "local"
    round: int = 0
    privacy: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.num_microbatches < 1:
            raise ConfigError(f"num_microbatches={self.num_microbatches} must be at least 1")
        if self.example_dtype not in DTYPES:
            raise ConfigError(f"example_dtype={self.example_dtype!r} is unknown; use one of {sorted(DTYPES)}")
        if not self.devices:
            self.devices = [f"stage{k}" for k in range(self.num_stages)]
        if len(self.devices) != self.num_stages or len(set(self.devices)) != len(self.devices):
            raise ConfigError(f"devices={self.devices} must name {self.num_stages} distinct devices, one per stage")
        if self.privacy is not None:
            from homesplit.privacy.config import PrivacyConfig

            PrivacyConfig.from_dict(self.privacy).clip_bounds(self.num_stages)

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.cuts) + 1

    def to_json(self) -> str:
        """Serialise to JSON."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PipelineJob:
        """Parse JSON written by `to_json`.

        Raises
        ------
        ConfigError
            If `text` is not valid JSON, nests deeper than
            `homesplit.json_limits.MAX_JSON_DEPTH` levels, or has unknown or
            missing keys or a value of the wrong type.
        """
        try:
            raw = loads_limited(text)
        except ValueError as exc:
            raise ConfigError(f"pipeline job is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"pipeline job must be a JSON object, not a {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown pipeline job keys {unknown}; allowed keys are {sorted(known)}")
        for key, kind in _JSON_TYPES.items():
            value = raw.get(key)
            if key in raw and not _has_type(value, kind):
                raise ConfigError(f"pipeline job key {key!r} has value {reprlib.repr(value)}; expected {_type_names(kind)}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"invalid pipeline job: {exc}") from exc

    def build_model(self, *, device: str | torch.device = "cpu") -> nn.Module:
        """Build the full model on `device` (``"meta"`` allocates nothing)."""
        factory = load_callable(self.model)
        with torch.device(device):
            model = factory(**self.model_kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{self.model!r} returned a {type(model).__name__}, not an nn.Module")
        return model

    def example_inputs(self, *, device: str | torch.device = "meta") -> tuple[torch.Tensor]:
        """Return the example input on `device` as a one-element tuple."""
        return (torch.zeros(self.example_shape, dtype=DTYPES[self.example_dtype], device=device),)


# JSON types of the keys, checked before construction: a string where a list
# belongs would otherwise pass, and "cuts": "ab" would mean three stages.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "example_shape": (list,),
    "cuts": (list,),
    "data": (str,),
    "model_kwargs": (dict,),
    "data_kwargs": (dict,),
    "example_dtype": (str,),
    "schedule": (str,),
    "num_microbatches": (int,),
    "optimizer": (dict,),
    "loss": (str,),
    "max_steps": (int, type(None)),
    "devices": (list,),
    "household": (str,),
    "round": (int,),
    "privacy": (dict, type(None)),
}


def _has_type(value: Any, kinds: tuple[type, ...]) -> bool:
    # bool is a subclass of int, but JSON true is not a count.
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def _type_names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", dict: "an object", int: "an integer", type(None): "null"}
    return " or ".join(names[kind] for kind in kinds)


def build_split(job: PipelineJob, *, device: str | torch.device = "meta") -> SplitModel:
    """Build the model on `device` and split it at the job's cuts."""
    model = job.build_model(device=device)
    return split_model(model, job.cuts, example_inputs=job.example_inputs(device=device))


# torch.optim classes that a pipeline stage cannot use, with the reason.
# Stages call ``step()`` without a closure on dense gradients of every shape.
_UNUSABLE_OPTIMIZERS = {
    "Optimizer": "it is the base class of torch optimizers",
    "LBFGS": "its step() needs a closure, which pipeline stages do not pass",
    "SparseAdam": "it needs sparse gradients, and pipeline stages compute dense ones",
    "Muon": "it supports 2-D parameters only, and segments have biases and other shapes",
}

OPTIMIZERS: tuple[str, ...] = tuple(
    sorted(
        name
        for name in dir(torch.optim)
        if isinstance(getattr(torch.optim, name), type)
        and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
        and name not in _UNUSABLE_OPTIMIZERS
    )
)
"""Names of the torch.optim classes that an optimizer spec may name (case-insensitive)."""


def optimizer_class(name: Any, *, where: str = "optimizer") -> type[torch.optim.Optimizer]:
    """Return the torch.optim class that `name` names, matched case-insensitively.

    Raises
    ------
    ConfigError
        If `name` names no torch.optim optimizer or one that pipeline stages
        cannot use; the message names ``{where}.name`` and lists `OPTIMIZERS`.
    """
    allowed = ", ".join(OPTIMIZERS)
    unusable = {key.lower(): reason for key, reason in _UNUSABLE_OPTIMIZERS.items()}
    if isinstance(name, str) and name.lower() in unusable:
        reason = unusable[name.lower()]
        raise ConfigError(f"{where}.name={name!r} is invalid, because {reason}; allowed: {allowed}")
    by_lower = {known.lower(): known for known in OPTIMIZERS}
    if not isinstance(name, str) or name.lower() not in by_lower:
        raise ConfigError(f"{where}.name={name!r} is not a torch.optim optimizer; allowed: {allowed}")
    return getattr(torch.optim, by_lower[name.lower()])


def check_optimizer(spec: Any, *, where: str = "optimizer") -> None:
    """Check an optimizer spec by building it for one dummy parameter.

    This catches an unknown name, an unknown keyword and a value that the
    optimizer rejects (a negative learning rate, Nesterov without momentum)
    without building the model, so a caller can run it before any stage
    process starts.

    Parameters
    ----------
    spec : dict
        ``{"name": <torch.optim class name>, **keyword arguments}``.
    where : str, default "optimizer"
        Key of the spec in the caller's configuration, used in messages.

    Raises
    ------
    ConfigError
        If `spec` is not such a mapping, names no usable optimizer, has an
        ``lr`` that is not a positive number, or the optimizer rejects it.
    """
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}={reprlib.repr(spec)} is invalid; allowed: a mapping such as {{name: SGD, lr: 0.05}}")
    cls = optimizer_class(spec["name"], where=where)
    options = {key: value for key, value in spec.items() if key != "name"}
    if "lr" in options:
        lr = options["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"{where}.lr={lr!r} is invalid; allowed: a positive, finite number")
    try:
        cls([nn.Parameter(torch.zeros(1))], **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}={reprlib.repr(spec)} is invalid: {_optimizer_problem(cls, exc)}") from exc


def build_optimizer(spec: dict[str, Any], parameters) -> torch.optim.Optimizer:
    """Build a torch optimizer from ``{"name": "Adam", "lr": 1e-3, ...}``.

    Raises
    ------
    ConfigError
        If the name is not in `OPTIMIZERS`, a keyword is unknown or the
        optimizer rejects a value.
    """
    options = dict(spec)
    cls = optimizer_class(options.pop("name", None))
    try:
        return cls(parameters, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid options {options} for optimizer {cls.__name__}: {_optimizer_problem(cls, exc)}") from exc


def _optimizer_problem(cls: type[torch.optim.Optimizer], exc: Exception) -> str:
    """Describe why `cls` rejected its options, with the keywords it accepts."""
    keywords = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "params")]
    return f"{exc}; {cls.__name__} accepts {', '.join(keywords)}"


def build_loss(reference: str) -> Callable[[Any, Any], torch.Tensor]:
    """Return the loss function named by `reference`; it must average over samples."""
    if reference == "cross_entropy":
        return torch.nn.functional.cross_entropy
    if reference == "mse":
        return torch.nn.functional.mse_loss
    return load_callable(reference)
