"""``homesplit plan``: profile a model on this machine and plan it onto a household's devices.

The model is built from a ``module:factory`` reference, imported with
``--app-dir`` (default: the current folder) first on sys.path. It is profiled
unit by unit on this machine (the reference device, with speed 1.0) and
planned onto the devices of a devices.yaml file. The plan is printed as a table, or as JSON
with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from homesplit.errors import ConfigError
from homesplit.planner.devices import load_devices
from homesplit.planner.optimize import plan_household
from homesplit.planner.plan import OBJECTIVES, Plan, StagePlan
from homesplit.planner.profiles import DeviceProfile
from homesplit.schedule import SCHEDULES

__all__ = ["register", "format_plan"]

_DTYPES = ("float32", "float64", "int64", "int32")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command to `subparsers`."""
    parser = subparsers.add_parser(
        "plan",
        help="plan where to cut a model and which device runs each segment",
        description=(
            "Profile a model on this machine, the reference device with speed 1.0, and plan it onto the "
            "devices of a devices.yaml file: cut points, the device of each stage and the micro-batch count."
        ),
    )
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="function that builds the model, e.g. homesplit.models:groupnorm_cnn")
    parser.add_argument(
        "--app-dir", type=Path, default=Path("."), metavar="DIR",
        help="folder put first on the Python path before MODULE is imported, such as a Flower app's root folder "
        "(default: the current folder)",
    )  # fmt: skip
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments of the factory as a JSON object (default: {})")
    parser.add_argument("--devices", required=True, type=Path, metavar="YAML", help="devices.yaml with each device's speed, memory, power and links")
    parser.add_argument("--objective", default="time", choices=OBJECTIVES, help="minimise step time or energy per sample (default: time)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="samples per mini-batch, that is per optimizer step (default: 32)")
    parser.add_argument(
        "--example-shape", required=True, type=int, nargs="+", metavar="DIM",
        help="shape of one sample without the batch dimension, e.g. 1 8 8 for 8x8 images or 12 for 12 tokens",
    )  # fmt: skip
    parser.add_argument(
        "--example-dtype", default="float32", choices=_DTYPES,
        help="dtype of the model input (default: float32); integer inputs are filled with token 1",
    )  # fmt: skip
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES, help="pipeline schedule, which sets the activation memory (default: 1f1b)")
    parser.add_argument("--optimizer", default="adam", choices=("sgd", "sgd_momentum", "adam", "adamw"), help="optimizer whose state counts towards memory (default: adam)")
    parser.add_argument("--microbatches", type=int, nargs="+", default=None, metavar="M", help="micro-batch counts to choose from (default: 1 2 4 8 16 32, those up to the batch size)")
    parser.add_argument("--data-owner", default=None, metavar="DEVICE", help="device that holds the data and must run stage 0 (default: any)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while profiling; stage processes use 1 (default: 1)")
    parser.add_argument(
        "--measure-overhead", action="store_true",
        help="also measure the stage runtime's seconds per micro-batch with two local stage processes (a few seconds); "
        "without it the plan leaves that cost out unless the cached profile has it",
    )  # fmt: skip
    parser.add_argument("--cache", type=Path, default=None, metavar="JSON", help="profile cache file; a cached profile of the same model and shape is reused")
    parser.add_argument("--out", type=Path, default=None, metavar="JSON", help="also write the plan as JSON to this file")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    # Read the devices first: a bad file should fail before the slow profiling.
    household = load_devices(args.devices)
    model_kwargs = _json_object(args.model_kwargs, "--model-kwargs")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads} must be at least 1")
    if any(dim < 1 for dim in args.example_shape):
        raise ConfigError(f"--example-shape {args.example_shape} must have positive dimensions")

    profile = _profile(args, model_kwargs)
    plan = plan_household(
        profile.layers,
        household.devices,
        household.links,
        batch_size=args.batch_size,
        objective=args.objective,
        schedule=args.schedule,
        microbatch_candidates=args.microbatches,
        optimizer=args.optimizer,
        data_owner=args.data_owner,
        stage_overhead_seconds=profile.stage_overhead_seconds or 0.0,
    )

    if args.out is not None:
        args.out.write_text(plan.to_json() + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_plan(plan, household.devices))
    return 0


def _profile(args: argparse.Namespace, model_kwargs: dict[str, Any]):
    # torch is imported here so that `homesplit --help` stays fast.
    import torch

    from homesplit.planner.profile import profile_model

    factory = _load_factory(args.model, args.app_dir)
    try:
        model = factory(**model_kwargs)
    except TypeError as error:
        raise ConfigError(f"{args.model} does not accept --model-kwargs {model_kwargs}: {error}") from error
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{args.model} returned a {type(model).__name__}, not a torch.nn.Module")
    model.train()

    shape = [args.batch_size, *args.example_shape]
    dtype = getattr(torch, args.example_dtype)
    if dtype.is_floating_point:
        example = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    else:
        # Token 1 is valid in every vocabulary of two or more, and 0 is often padding.
        example = torch.ones(shape, dtype=dtype)
    # Stage processes run single-threaded by default, so the profile should too.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return profile_model(model, (example,), cache_path=args.cache, measure_overhead=args.measure_overhead)
    finally:
        torch.set_num_threads(previous_threads)


def _load_factory(reference: str, app_dir: Path):
    """Import MODULE:FACTORY with `app_dir` first on sys.path, as ``homesplit run`` does with the app folder.

    A console script, unlike ``python -m``, does not put the current folder
    on sys.path, so without this an app's own modules are not found.
    """
    from homesplit.job import load_callable

    folder = app_dir.resolve()
    if not folder.is_dir():
        raise ConfigError(f"--app-dir {str(app_dir)!r} is not a folder; pass the folder that contains the model's module")
    sys.path.insert(0, str(folder))
    try:
        return load_callable(reference)
    except ConfigError as exc:
        missing = exc.__cause__
        if isinstance(missing, ModuleNotFoundError) and missing.name == reference.partition(":")[0].split(".")[0]:
            raise ConfigError(
                f"{exc}. homesplit plan looks for module {missing.name!r} in --app-dir {folder} and on the Python path; "
                f"run it from the folder that contains {missing.name}/ or {missing.name}.py, or pass that folder as "
                "--app-dir, e.g. --app-dir examples/household-digits"
            ) from exc
        raise
    finally:
        sys.path.remove(str(folder))


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{option} {text!r} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ConfigError(f"{option} {text!r} must be a JSON object such as '{{\"depth\": 4}}'")
    return value


def format_plan(plan: Plan, devices: list[DeviceProfile]) -> str:
    """Return the plan as a text table with one row per stage, and a summary.

    Energy per stage is joules per mini-batch: busy watts while the stage
    computes or its runtime works, and idle watts for the rest of the step.
    It is "-" where the device has no power figures.
    """
    by_name = {device.name: device for device in devices}
    header = [
        "stage", "device", "layers", "parameters", "memory MiB", "compute ms/mb", "runtime ms/mb", "transfer ms/mb",
        "energy J/step",
    ]  # fmt: skip
    rows = [header]
    for stage in plan.stages:
        rows.append(
            [
                str(stage.index),
                stage.device,
                _layer_range(stage.layers),
                f"{stage.parameter_count:,}",
                f"{stage.memory_bytes / 2**20:.2f}",
                f"{stage.compute_seconds * 1e3:.3f}",
                f"{stage.runtime_seconds * 1e3:.3f}",
                f"{stage.transfer_seconds * 1e3:.3f}",
                _stage_energy(plan, stage, by_name[stage.device]),
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]

    energy = "-" if plan.energy_joules_per_sample is None else f"{plan.energy_joules_per_sample:.4g} J/sample"
    lines += [
        "",
        f"objective: {plan.objective}; schedule: {plan.schedule}; optimizer: {plan.optimizer}",
        f"micro-batches: {plan.num_microbatches} of at most {plan.microbatch_size} samples per mini-batch of {plan.batch_size}",
        f"predicted step: {plan.step_seconds * 1e3:.3f} ms (bottleneck {plan.bottleneck_seconds * 1e3:.3f} ms per micro-batch); energy: {energy}",
        f"cuts: {', '.join(plan.cuts) or 'none (one stage)'}",
        f"idle devices: {', '.join(plan.idle_devices) or 'none'}",
    ]
    return "\n".join(lines)


def _layer_range(layers: list[str]) -> str:
    if len(layers) == 1:
        return layers[0]
    return f"{layers[0]} .. {layers[-1]} ({len(layers)})"


def _stage_energy(plan: Plan, stage: StagePlan, device: DeviceProfile) -> str:
    if not device.has_power:
        return "-"
    # compute_seconds covers the largest micro-batch, but a step computes every
    # sample once, and the runtime's cost comes once per micro-batch that runs.
    count = math.ceil(plan.batch_size / plan.microbatch_size)
    busy = stage.compute_seconds / plan.microbatch_size * plan.batch_size + count * stage.runtime_seconds
    joules = device.busy_watts * busy + device.idle_watts * max(0.0, plan.step_seconds - busy)
    return f"{joules:.4g}" if math.isfinite(joules) else "-"
