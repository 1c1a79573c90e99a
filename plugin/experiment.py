"""The experiment file of ``homesplit run``: schema, defaults and validation.

Everything is checked before any process starts, and every error names the
key, the value and what is allowed. An example::

    app: .                                  # Flower app folder, relative to this file
    rounds: 5
    seed: 0
    model: household_digits.task:build_model
    example-shape: [1, 1, 8, 8]
    households:
      - id: household-a
        devices:
          - {name: laptop, holds-data: true}
          - {name: phone}
    training: {local-epochs: 2, batch-size: 32, num-microbatches: 4, schedule: 1f1b,
               max-stages: 0, optimizer: {name: SGD, lr: 0.05}}
    data: {partitioner: iid, dirichlet-alpha: 0.5}
    evaluation: {fraction-federated: 0.0}
    timeouts: {startup: 120, round: 300, connect: 60, run: 600}
    privacy: {mode: sample, target-epsilon: 8, max-grad-norm: 1.0}
    planner: {objective: time, link-probe-seconds: 30}

A device may give ``idle-watts`` and ``busy-watts``, which its SuperNode gets
as node config; ``planner: {objective: energy}`` needs them on every device.
``privacy`` (default: none, no DP) applies to every household; a household's
own ``privacy`` key replaces it, and ``privacy: null`` there turns DP off for
that household. `homesplit.privacy.settings` lists the keys.
"""

from __future__ import annotations

import copy
import math
import reprlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from homesplit.errors import ConfigError
from homesplit.job import check_optimizer, load_callable
from homesplit.partition import candidate_cuts
from homesplit.pki import validate_name
from homesplit.planner.plan import OBJECTIVES
from homesplit.privacy.settings import check_central_noise, check_settings
from homesplit.schedule import SCHEDULES

__all__ = ["Experiment", "load_experiment", "household_privacy", "DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "app": ".",
    "rounds": 5,
    "seed": 0,
    "model": None,
    "example-shape": None,
    "households": None,
    "training": {
        "local-epochs": 1,
        "batch-size": 32,
        "num-microbatches": 4,
        "schedule": "1f1b",
        "max-stages": 0,
        "optimizer": {"name": "SGD", "lr": 0.05},
    },
    "data": {"partitioner": "iid", "dirichlet-alpha": 0.5},
    "evaluation": {"fraction-federated": 0.0},
    "timeouts": {"startup": 120.0, "round": 300.0, "connect": 60.0, "run": 900.0},
    "privacy": None,
    "planner": {"objective": "balanced", "link-probe-seconds": 30.0},
}
_REQUIRED = ("model", "example-shape", "households")
_HOUSEHOLD_KEYS = {"id", "devices", "privacy"}
_DEVICE_KEYS = {"name", "holds-data", "idle-watts", "busy-watts"}
_OBJECTIVES = ("balanced", *OBJECTIVES)
_PARTITIONERS = ("iid", "dirichlet")


@dataclass
class Experiment:
    """A validated experiment.

    Attributes
    ----------
    path : Path
        The YAML file.
    app_dir : Path
        The Flower app folder (absolute).
    config : dict
        The full configuration with defaults filled in, as written to results.json.
    num_layers : int
        Segments the model can be cut into at most.
    """

    path: Path
    app_dir: Path
    config: dict[str, Any]
    num_layers: int

    @property
    def households(self) -> list[dict[str, Any]]:
        """Households as ``{"id": str, "devices": [{"name": str, "holds-data": bool}]}``."""
        return self.config["households"]


def _name_text(value: Any, where: str) -> str:
    """Return a household or device name, which YAML must give as a string."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}={_short(value)} is invalid; allowed: a name string such as 'phone' (quote numbers)")
    return value


# Python 3.11's reprlib.Repr takes its limits as attributes, not arguments.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80


def _short(value: Any) -> str:
    """Represent `value` for an error message without expanding a huge structure.

    YAML aliases can make a small file expand into a value of billions of
    items, so only the first levels and items are shown.
    """
    return _SHORT_REPR.repr(value)[:300]


def load_experiment(path: str | Path, *, rounds: int | None = None) -> Experiment:
    """Read, fill in and validate an experiment file.

    Parameters
    ----------
    path : str or Path
        The YAML file.
    rounds : int or None, default None
        Overrides the file's ``rounds``.

    Raises
    ------
    ConfigError
        On a missing file, invalid YAML, an unknown key, a wrong type, a
        household without exactly one data owner, or more stages than the
        model has layers.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"experiment file {str(file)!r} not found; pass the path of an experiment YAML file")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"experiment file {str(file)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"experiment file {str(file)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment file {str(file)!r} must be a mapping of keys, not a {type(raw).__name__}")

    config = _merge(DEFAULTS, raw, prefix="")
    if rounds is not None:
        config["rounds"] = rounds
    for key in _REQUIRED:
        if config[key] is None:
            raise ConfigError(f"key {key!r} is missing in {file}; see homesplit.experiment for an example")

    app_dir = (file.parent / str(config["app"])).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"app={config['app']!r} is not a Flower app folder: {app_dir / 'pyproject.toml'} not found")
    _check_numbers(config)
    _check_households(config)
    _check_privacy(config)
    _check_planner(config)
    num_layers = _count_layers(config, app_dir)
    _check_stages(config, num_layers)
    return Experiment(path=file.resolve(), app_dir=app_dir, config=config, num_layers=num_layers)


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Return `config` filled in with the defaults of every key it lacks.

    A results file written before a key existed then compares equal to a
    config that has the key at its default value.

    Raises
    ------
    ConfigError
        If `config` has a key that experiment files no longer allow.
    """
    return _merge(DEFAULTS, config, prefix="")


def _merge(defaults: dict[str, Any], given: dict[str, Any], *, prefix: str) -> dict[str, Any]:
    """Fill `given` in from `defaults`, rejecting unknown keys with their full path."""
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"unknown key {name!r}; allowed keys here are {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, dict) and key != "optimizer":
            if not isinstance(value, dict):
                raise ConfigError(f"{name}={_short(value)} must be a mapping with keys {sorted(default)}")
            merged[key] = _merge(default, value, prefix=f"{name}.")
        else:
            merged[key] = value
    return merged


def _require(value: Any, kind: type | tuple, name: str, allowed: str) -> None:
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{name}={_short(value)} is invalid; allowed: {allowed}")
    if not isinstance(value, kind):
        raise ConfigError(f"{name}={_short(value)} is invalid; allowed: {allowed}")


def _check_numbers(config: dict[str, Any]) -> None:
    _require(config["rounds"], int, "rounds", "an integer of at least 1")
    if config["rounds"] < 1:
        raise ConfigError(f"rounds={config['rounds']} is invalid; allowed: an integer of at least 1")
    _require(config["seed"], int, "seed", "an integer")
    training = config["training"]
    for key in ("local-epochs", "batch-size", "num-microbatches"):
        _require(training[key], int, f"training.{key}", "an integer of at least 1")
        if training[key] < 1:
            raise ConfigError(f"training.{key}={training[key]} is invalid; allowed: an integer of at least 1")
    _require(training["max-stages"], int, "training.max-stages", "0 (one stage per device) or a positive integer")
    if training["schedule"] not in SCHEDULES:
        raise ConfigError(f"training.schedule={training['schedule']!r} is invalid; allowed: {', '.join(SCHEDULES)}")
    check_optimizer(training["optimizer"], where="training.optimizer")
    if config["data"]["partitioner"] not in _PARTITIONERS:
        raise ConfigError(f"data.partitioner={config['data']['partitioner']!r} is invalid; allowed: {', '.join(_PARTITIONERS)}")
    fraction = config["evaluation"]["fraction-federated"]
    _require(fraction, (int, float), "evaluation.fraction-federated", "a number from 0.0 to 1.0")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"evaluation.fraction-federated={fraction} is invalid; allowed: a number from 0.0 to 1.0")
    for key, value in config["timeouts"].items():
        _require(value, (int, float), f"timeouts.{key}", "a positive number of seconds")
        if not math.isfinite(value):
            raise ConfigError(f"timeouts.{key}={value} is invalid; allowed: a positive, finite number of seconds")
        if value <= 0:
            raise ConfigError(f"timeouts.{key}={value} is invalid; allowed: a positive number of seconds")
    shape = config["example-shape"]
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(f"example-shape={_short(shape)} is invalid; allowed: a list of positive integers, e.g. [1, 1, 8, 8]")


def _check_households(config: dict[str, Any]) -> None:
    households = config["households"]
    if not isinstance(households, list) or not households:
        raise ConfigError(f"households={_short(households)} is invalid; allowed: a non-empty list of {{id, devices}} mappings")
    seen: set[str] = set()
    for index, household in enumerate(households):
        where = f"households[{index}]"
        if not isinstance(household, dict):
            raise ConfigError(f"{where}={_short(household)} is invalid; allowed: a mapping with keys {sorted(_HOUSEHOLD_KEYS)}")
        unknown = sorted(set(household) - _HOUSEHOLD_KEYS)
        if unknown:
            raise ConfigError(f"unknown key {where}.{unknown[0]!r}; allowed keys here are {sorted(_HOUSEHOLD_KEYS)}")
        hid = validate_name(_name_text(household.get("id", ""), f"{where}.id"), f"{where}.id")
        if hid in seen:
            raise ConfigError(f"{where}.id={hid!r} repeats another household's id; give every household its own id")
        seen.add(hid)
        _check_devices(household.get("devices"), f"{where} ({hid})")


def _check_devices(devices: Any, where: str) -> None:
    if not isinstance(devices, list) or not devices:
        raise ConfigError(f"{where}.devices={_short(devices)} is invalid; allowed: a non-empty list of {{name, holds-data}} mappings")
    names = []
    for device in devices:
        if not isinstance(device, dict):
            raise ConfigError(f"{where}.devices entry {_short(device)} is invalid; allowed: a mapping with keys {sorted(_DEVICE_KEYS)}")
        unknown = sorted(set(device) - _DEVICE_KEYS)
        if unknown:
            raise ConfigError(f"unknown key {where}.devices.{unknown[0]!r}; allowed keys here are {sorted(_DEVICE_KEYS)}")
        names.append(validate_name(_name_text(device.get("name", ""), f"{where}.devices.name"), f"{where}.devices.name"))
        device.setdefault("holds-data", False)
        _require(device["holds-data"], bool, f"{where}.devices[{names[-1]}].holds-data", "true or false")
        _check_watts(device, f"{where}.devices[{names[-1]}]")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.devices={names} repeats a device name; names must differ within a household")
    owners = [d["name"] for d in devices if d["holds-data"]]
    if len(owners) != 1:
        raise ConfigError(
            f"{where} has {len(owners)} data owners {owners}; allowed: exactly one device with holds-data: true"
        )


def _check_watts(device: dict[str, Any], where: str) -> None:
    """Check a device's optional power figures: both or neither, finite watts >= 0, busy not below idle."""
    for key in ("idle-watts", "busy-watts"):
        if key in device:
            value = device[key]
            _require(value, (int, float), f"{where}.{key}", "a finite number of watts, at least 0")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}.{key}={value} is invalid; allowed: a finite number of watts, at least 0")
    if ("idle-watts" in device) != ("busy-watts" in device):
        given = "idle-watts" if "idle-watts" in device else "busy-watts"
        raise ConfigError(f"{where} gives only {given}={device[given]}; give both idle-watts and busy-watts, or neither")
    if "idle-watts" in device and device["busy-watts"] < device["idle-watts"]:
        raise ConfigError(
            f"{where}.busy-watts={device['busy-watts']} is below idle-watts={device['idle-watts']}; "
            "busy power includes idle power, so give busy-watts >= idle-watts"
        )


def _check_planner(config: dict[str, Any]) -> None:
    planner = config["planner"]
    if planner["objective"] not in _OBJECTIVES:
        raise ConfigError(f"planner.objective={_short(planner['objective'])} is invalid; allowed: {', '.join(_OBJECTIVES)}")
    seconds = planner["link-probe-seconds"]
    _require(seconds, (int, float), "planner.link-probe-seconds", "a positive, finite number of seconds")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"planner.link-probe-seconds={seconds} is invalid; allowed: a positive, finite number of seconds")
    if planner["objective"] != "energy":
        return
    for household in config["households"]:
        unpowered = [d["name"] for d in household["devices"] if "idle-watts" not in d]
        if unpowered:
            raise ConfigError(
                f"planner.objective='energy' needs idle-watts and busy-watts on every device, but household "
                f"{household['id']} has none on {unpowered}; add them to those devices or use objective: time"
            )


def _check_privacy(config: dict[str, Any]) -> None:
    """Validate the experiment's and each household's privacy settings, filling in their defaults."""
    if config["privacy"] is not None:
        config["privacy"] = check_settings(config["privacy"], where="privacy")
    for index, household in enumerate(config["households"]):
        if household.get("privacy") is not None:
            household["privacy"] = check_settings(household["privacy"], where=f"households[{index}].privacy")
    check_central_noise(household_privacy(config), where="privacy")


def household_privacy(config: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Return each household's validated privacy settings, None for a household without DP."""
    chosen = {}
    for household in config["households"]:
        chosen[household["id"]] = household["privacy"] if "privacy" in household else config["privacy"]
    return chosen


def _count_layers(config: dict[str, Any], app_dir: Path) -> int:
    """Return how many segments the model can be cut into, building it on the meta device."""
    sys.path.insert(0, str(app_dir))
    try:
        factory = load_callable(str(config["model"]))
        with torch.device("meta"):
            model = factory()
            inputs = (torch.zeros(config["example-shape"]),)
        return len(candidate_cuts(model, example_inputs=inputs)) + 1
    except ConfigError as exc:
        raise ConfigError(f"model={config['model']!r} cannot be loaded from app folder {app_dir}: {exc}") from exc
    finally:
        sys.path.remove(str(app_dir))


def _check_stages(config: dict[str, Any], num_layers: int) -> None:
    max_stages = config["training"]["max-stages"]
    if max_stages < 0 or max_stages > num_layers:
        raise ConfigError(
            f"training.max-stages={max_stages} is invalid: the model has {num_layers} layers; "
            f"allowed: 0 (one stage per device) to {num_layers}"
        )
    if max_stages == 0:
        for household in config["households"]:
            if len(household["devices"]) > num_layers:
                raise ConfigError(
                    f"household {household['id']} has {len(household['devices'])} devices, more stages than the "
                    f"model's {num_layers} layers; remove devices or set training.max-stages to at most {num_layers}"
                )
