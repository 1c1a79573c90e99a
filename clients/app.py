"""The device ClientApp: one household device that runs one pipeline stage per message.

`device_app` builds a Flower `ClientApp` from three user functions. Nothing
is kept in module globals: in deployment Flower runs every message in a new
process, and in simulation module globals are shared between nodes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from homesplit.allocator import pin_mmap_threshold
from homesplit.clients.link_probe import echo_owner, measure_peers
from homesplit.clients.node import DeviceConfig, read_device_config
from homesplit.clients.privacy import (
    RoundDeclined,
    declined_reply,
    load_budget,
    owner_round_privacy,
    private_batches,
    privacy_metrics,
    read_round_privacy,
    save_budget,
)
from homesplit.clients.stage_round import StageOutcome, close_downstream, run_stage_round
from homesplit.errors import ConfigError, LinkError
from homesplit.household_plan import HouseholdPlan
from homesplit.job import check_optimizer
from homesplit.json_limits import loads_limited
from homesplit.link import LinkTimeouts
from homesplit.link_probes import LinkProbeRequest, encode_results
from homesplit.minibatches import minibatches, round_seed
from homesplit.planner.benchmark import measure_matmul_flops
from homesplit.privacy.accounting import PrivacyBudget
from homesplit.records import ARRAYS, CONFIG, DEVICE, LINK_PROBE, LINKS, METRICS, PLAN

__all__ = ["DeviceData", "device_app"]

logger = logging.getLogger(__name__)

# Flower's code for "the ClientApp raised an exception" (flwr.common.constant.ErrorCode).
_CLIENT_APP_RAISED_EXCEPTION = 2

_DEFAULT_OPTIMIZER = {"name": "SGD", "lr": 0.05}

# The defaults of measure_matmul_flops, which profile_model uses for the reference device.
_BENCHMARK_SIZE = 256
_BENCHMARK_SECONDS = 0.2


@dataclass(frozen=True)
class DeviceData:
    """The data owner's examples.

    Parameters
    ----------
    train : tuple of (Tensor, Tensor)
        Training inputs and targets, examples along dim 0.
    test : tuple of (Tensor, Tensor) or None, default None
        Local test inputs and targets for federated evaluation.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor] | None = None


LoadData = Callable[[DeviceConfig], DeviceData]


def device_app(
    *,
    model_fn: Callable[[], nn.Module],
    example_inputs: Callable[[], tuple],
    load_data: LoadData,
    loss: str = "cross_entropy",
) -> ClientApp:
    """Build the ClientApp that every device of every household runs.

    Parameters
    ----------
    model_fn : callable
        Builds the full model; called under ``torch.device("meta")``, so only
        the device's own segment ever gets memory.
    example_inputs : callable
        Returns the model's positional inputs for a batch of one, as a tuple.
    load_data : callable
        ``load_data(device: DeviceConfig) -> DeviceData``; called on the data
        owner only (``holds-data=true``), with its ``partition-id`` and
        ``num-partitions``.
    loss : str, default "cross_entropy"
        ``"cross_entropy"``, ``"mse"`` or a ``module:function`` reference; it
        must average over samples.

    Returns
    -------
    ClientApp
        Handles ``query.discover``, ``query.probe_links``, ``train`` and
        ``evaluate`` messages.
    """
    app = ClientApp()

    @app.query("discover")
    def discover(msg: Message, context: Context) -> Message:
        device = read_device_config(context.node_config, context.run_config, context.run_id)
        num_examples = len(load_data(device).train[0]) if device.holds_data else 0
        record = ConfigRecord(
            {
                "household": device.household,
                "device": device.device,
                "address": device.advertise,
                "holds-data": device.holds_data,
                "num-examples": num_examples,
                "memory-bytes": int(psutil.virtual_memory().available),
                "cpu-count": os.cpu_count() or 1,
                "flops-per-second": _self_benchmark(device.threads),
            }
        )
        if device.idle_watts is not None and device.busy_watts is not None:
            record["idle-watts"] = device.idle_watts
            record["busy-watts"] = device.busy_watts
        return Message(RecordDict({DEVICE: record}), reply_to=msg)

    @app.query("probe_links")
    def probe_links(msg: Message, context: Context) -> Message:
        device: DeviceConfig | None = None
        try:
            device = read_device_config(context.node_config, context.run_config, context.run_id)
            request = LinkProbeRequest.from_config(msg.content.config_records[LINK_PROBE])
            if device.device != request.owner:
                return Message(RecordDict({LINKS: ConfigRecord({"echoed": echo_owner(device, request)})}), reply_to=msg)
            record = ConfigRecord(
                {"measurements": encode_results(measure_peers(device, request)), "tls": not device.insecure_links}
            )
            return Message(RecordDict({LINKS: record}), reply_to=msg)
        except Exception as exc:  # every failure becomes an error reply naming the device
            name = f"{device.household}/{device.device}" if device else "device with an invalid node config"
            reason = f"{name} failed the link probe: {type(exc).__name__}: {exc}"
            logger.error("%s", reason)
            return Message(Error(code=_CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    def handle(msg: Message, context: Context, kind: str) -> Message:
        device: DeviceConfig | None = None
        stage = -1
        try:
            device = read_device_config(context.node_config, context.run_config, context.run_id)
            torch.set_num_threads(device.threads)
            if device.return_freed_memory:
                # Memory-tight devices trade page faults for a peak RSS that
                # follows the live tensors, as the planner's memory model does.
                pin_mmap_threshold()
            config = msg.content.config_records[CONFIG]
            plan = HouseholdPlan.from_json(str(config[PLAN]))
            stage = int(config["stage"])
            outcome, num_examples = _run(
                device, plan, stage, kind, msg, config, model_fn, example_inputs, load_data, loss, context
            )  # fmt: skip
            return _reply(msg, outcome, stage, num_examples, kind, plan.num_stages)
        except RoundDeclined as declined:  # a status reply, not an error: the budget is spent
            return declined_reply(msg, declined.decision, declined.budget)
        except Exception as exc:  # every failure becomes an error reply naming the device
            return _error_reply(msg, device, stage, exc)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle(msg, context, "train")

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle(msg, context, "evaluate")

    return app


def _self_benchmark(threads: int) -> float:
    """Measure matrix-multiply FLOP/s with the torch threads that this device's stages use.

    The matrix size and duration match the reference measurement of
    `homesplit.planner.profile.profile_model`, so the planner compares like with like.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_matmul_flops(size=_BENCHMARK_SIZE, min_seconds=_BENCHMARK_SECONDS)
    finally:
        torch.set_num_threads(previous)


def _run(device, plan, stage, kind, msg, config, model_fn, example_inputs, load_data, loss, context) -> tuple[StageOutcome, int]:
    server_round = int(config["server-round"])
    epochs = int(config.get("local-epochs", 1))
    batches = None
    num_examples = 0
    privacy = read_round_privacy(config) if kind == "train" else None
    budget = None
    if stage == 0:
        if not device.holds_data:
            raise ConfigError(f"the plan runs {device.household}/{device.device} as stage 0, but holds-data is false")
        data = load_data(device)
        examples = data.train if kind == "train" else data.test
        if examples is None:
            raise ConfigError(f"load_data returned no test split on {device.household}/{device.device}; federated evaluation needs one")
        batch_size = int(config.get("batch-size", 32))
        if kind == "train":
            seed = round_seed(int(config.get("seed", 0)), server_round)
            batches = minibatches(*examples, batch_size=batch_size, epochs=epochs, seed=seed)
        else:
            batches = minibatches(*examples, batch_size=batch_size, epochs=1, seed=None)
        num_examples = len(examples[0])

    timeouts = LinkTimeouts(
        connect=float(config.get("connect-timeout", 60.0)),
        recv=float(config.get("recv-timeout", 300.0)),
        peer_silence=float(config.get("peer-silence", 15.0)),
    )
    if stage == 0 and kind == "train":
        privacy = owner_round_privacy(
            device.household, context.run_config, config, dataset_size=num_examples, num_stages=plan.num_stages,
            sent=privacy,
        )  # fmt: skip
        if privacy is not None:
            budget = _check_budget(device, plan, context, privacy, server_round, timeouts)
            if privacy.config.mode == "sample":
                batches = private_batches(examples, privacy)
    weights = {name: torch.from_numpy(array.numpy().copy()) for name, array in msg.content.array_records[ARRAYS].items()}
    optimizer = _read_optimizer(config)
    logger.info("%s/%s: %s round %d as stage %d of %d", device.household, device.device, kind, server_round, stage, plan.num_stages)
    outcome = run_stage_round(
        device, plan, stage, kind=kind, server_round=server_round, model_fn=model_fn, example_inputs=example_inputs,
        weights=weights, batches=batches, loss=loss, optimizer=optimizer, timeouts=timeouts,
        privacy=privacy.config.to_dict() if privacy is not None else None,
    )  # fmt: skip
    if outcome.privacy is not None:
        outcome.extra_metrics["privacy-steps"] = int(outcome.privacy["steps"])
    if budget is not None:
        # Only a round that replies spends budget: a failed round releases nothing.
        steps = int(outcome.privacy["steps"])
        dp = privacy.config
        budget.record_round(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate, steps=steps)
        save_budget(context, budget)
        outcome.extra_metrics.update(privacy_metrics(budget, privacy, steps=steps))
    if stage > 0:
        # Other stages see every step's batch size, so they count examples too.
        passes = epochs if kind == "train" else 1
        num_examples = sum(s.batch_size for s in outcome.steps) // max(passes, 1)
    return outcome, num_examples


def _read_optimizer(config: ConfigRecord) -> dict:
    """Decode and check the message's optimizer spec, such as ``{"name": "SGD", "lr": 0.05}``."""
    text = str(config.get("optimizer", json.dumps(_DEFAULT_OPTIMIZER)))
    try:
        spec = loads_limited(text)
    except ValueError as exc:
        raise ConfigError(
            f"the message's optimizer is not valid JSON: {exc}; check that the server runs the same homesplit version "
            "as this device"
        ) from exc
    check_optimizer(spec)
    return spec


def _check_budget(device, plan, context, privacy, server_round, timeouts) -> PrivacyBudget:
    """Return the data owner's budget if the round fits into it; otherwise stop the household and raise `RoundDeclined`."""
    budget = load_budget(context, privacy)
    decision = budget.check_round(
        noise_multiplier=privacy.config.noise_multiplier, sample_rate=privacy.config.sample_rate, steps=privacy.steps
    )
    if decision.allowed:
        logger.info("%s: round %d %s", device.household, server_round, decision.message)
        return budget
    close_downstream(device, plan, kind="train", server_round=server_round, timeouts=timeouts, reason=decision.message)
    raise RoundDeclined(decision, budget)


def _reply(msg: Message, outcome: StageOutcome, stage: int, num_examples: int, kind: str, num_stages: int) -> Message:
    metrics = MetricRecord(
        {"num-examples": num_examples, "stage": stage, "bytes-sent": outcome.bytes_sent, "seconds": outcome.seconds}
    )
    for key, value in outcome.extra_metrics.items():
        metrics[key] = value
    if stage == num_stages - 1:
        samples = sum(s.batch_size for s in outcome.steps)
        loss_sum = sum(s.loss_sum or 0.0 for s in outcome.steps)
        correct = [s.correct for s in outcome.steps if s.batch_size]
        prefix = "train" if kind == "train" else "eval"
        if samples:
            metrics[f"{prefix}-loss"] = loss_sum / samples
            if correct and all(c is not None for c in correct):
                metrics[f"{prefix}-accuracy"] = sum(correct) / samples
    content = RecordDict({METRICS: metrics})
    if kind == "train":
        content[ARRAYS] = ArrayRecord({name: Array(value.numpy()) for name, value in outcome.state.items()})
    return Message(content, reply_to=msg)


def _error_reply(msg: Message, device: DeviceConfig | None, stage: int, exc: Exception) -> Message:
    name = f"{device.household}/{device.device}" if device else "device with an invalid node config"
    reason = f"{name} (stage {stage}) failed: {type(exc).__name__}: {exc}"
    if device is not None and device.simulated and isinstance(exc, LinkError):
        reason += (
            ". In simulation every device of a household must run at once: raise init-args-num-cpus or lower "
            "client-resources-num-cpus in the simulation's federation config, so that "
            "init-args-num-cpus // client-resources-num-cpus is at least the number of devices that train in a round"
        )
    logger.error("%s", reason)
    return Message(Error(code=_CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
