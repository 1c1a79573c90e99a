"""One stage of a household pipeline for one Flower message: connect, run, report."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from homesplit.errors import ConfigError
from homesplit.household_plan import HouseholdPlan
from homesplit.job import build_loss, build_optimizer
from homesplit.link import Link, LinkTimeouts
from homesplit.partition import split_model
from homesplit.privacy.attach import prepare_stage
from homesplit.stage import StageRunner, StepResult
from homesplit.transport import PeerIdentity, TcpTransport, open_listener, parse_address
from homesplit.clients.node import DeviceConfig
from homesplit.clients.rendezvous import publish_port, wait_for_port

__all__ = ["StageOutcome", "run_stage_round", "close_downstream", "device_transport"]

logger = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    """Result of one stage for one message.

    Attributes
    ----------
    state : dict of str to Tensor
        The segment's weights after the round (unchanged for evaluation).
    steps : list of StepResult
        One per mini-batch.
    bytes_sent : int
        Bytes this stage wrote to its links.
    seconds : float
        Wall time from connecting to the last step.
    privacy : dict or None
        The privacy hook's report (mode, sigma, q, DP steps taken), None without DP.
    extra_metrics : dict
        Metrics the device adds to its reply, such as the data owner's epsilon.
    """

    state: dict[str, torch.Tensor]
    steps: list[StepResult] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0
    privacy: dict[str, Any] | None = None
    extra_metrics: dict[str, float | int] = field(default_factory=dict)


def device_transport(device: DeviceConfig, timeouts: LinkTimeouts):
    """Return the device's household transport: mutual TLS with its bundle, or plaintext TCP if insecure-links is set."""
    if device.insecure_links:
        logger.warning("%s/%s uses plaintext links (insecure-links=true)", device.household, device.device)
        return TcpTransport(timeouts=timeouts)
    from homesplit.tls import TlsTransport

    return TlsTransport.from_bundle(device.bundle, timeouts=timeouts)


def _connect(
    device: DeviceConfig, plan: HouseholdPlan, stage: int, kind: str, server_round: int, timeouts: LinkTimeouts
) -> tuple[Link | None, Link | None]:
    """Open the listener, dial downstream, then accept upstream (downstream listens, upstream dials)."""
    transport = device_transport(device, timeouts)
    local = PeerIdentity(device.device, stage, plan.household, server_round)
    listener: socket.socket | None = None
    upstream = downstream = None
    try:
        if stage > 0:
            listener = open_listener(device.listen)
            port = listener.getsockname()[1]
            if parse_address(device.listen)[1] == 0:
                publish_port(device.rendezvous_dir, plan.household, kind, server_round, stage, port)
        if stage < plan.num_stages - 1:
            following = plan.stages[stage + 1]
            address = following.address
            host, port = parse_address(address)
            if port == 0:
                port = wait_for_port(device.rendezvous_dir, plan.household, kind, server_round, stage + 1, timeout=timeouts.connect)
                address = f"{host}:{port}"
            expect = PeerIdentity(following.device, stage + 1, plan.household, server_round)
            downstream = transport.dial(address, local=local, expect=expect)
        if stage > 0:
            preceding = plan.stages[stage - 1]
            expect = PeerIdentity(preceding.device, stage - 1, plan.household, server_round)
            upstream = transport.accept(listener, local=local, expect=expect)
    except BaseException:
        if downstream is not None:
            downstream.close(reason=f"stage {stage} could not connect upstream")
        raise
    finally:
        if listener is not None:
            listener.close()
    return upstream, downstream


def close_downstream(
    device: DeviceConfig, plan: HouseholdPlan, *, kind: str, server_round: int, timeouts: LinkTimeouts, reason: str
) -> None:
    """Connect stage 0 to stage 1 and close the link at once, sending `reason`.

    The next stage then fails with `PeerAbortedError` carrying `reason` and
    passes it on downstream, so no stage of the household waits for its
    connect or receive deadline.
    """
    if plan.num_stages < 2:
        return
    _, downstream = _connect(device, plan, 0, kind, server_round, timeouts)
    if downstream is not None:
        downstream.close(reason=reason)


def run_stage_round(
    device: DeviceConfig,
    plan: HouseholdPlan,
    stage: int,
    *,
    kind: str,
    server_round: int,
    model_fn: Callable[[], nn.Module],
    example_inputs: Callable[[], tuple],
    weights: dict[str, torch.Tensor],
    batches: Iterable[tuple[Any, Any]] | None,
    loss: str,
    optimizer: dict[str, Any] | None,
    timeouts: LinkTimeouts,
    privacy: dict[str, Any] | None = None,
) -> StageOutcome:
    """Build this stage's segment, connect to its neighbours and run the batches.

    Parameters
    ----------
    kind : {"train", "evaluate"}
        Training steps or forward-only evaluation steps.
    batches : iterable of (inputs, targets) or None
        Mini-batches; stage 0 only. Other stages learn each step from stage 0.
    loss : str
        Loss name or ``module:function`` (see `homesplit.job.build_loss`).
    optimizer : dict or None
        Optimizer spec for training, e.g. ``{"name": "SGD", "lr": 0.05}``.
    privacy : dict or None, default None
        Training only: `homesplit.privacy.PrivacyConfig` keys; every stage of
        the household must get the same settings.

    Raises
    ------
    ConfigError
        If the plan does not name this device at `stage`, or weights are missing.
    LinkError
        If a neighbour cannot be reached or fails mid-round.
    """
    if not 0 <= stage < plan.num_stages or plan.stages[stage].device != device.device:
        raise ConfigError(
            f"the plan puts {plan.stages[stage].device if 0 <= stage < plan.num_stages else '?'} at stage {stage}, "
            f"but this SuperNode is {device.household}/{device.device}; check the node config 'device' keys"
        )
    if (stage == 0) != (batches is not None):
        raise ConfigError(f"stage {stage}: only stage 0, the data owner, streams mini-batches")

    # Only this stage's segment gets real storage; the rest stays on "meta".
    with torch.device("meta"):
        split = split_model(model_fn(), plan.cuts, example_inputs=example_inputs())
    segment = split.segments[stage]
    segment.to_empty(device="cpu")
    training = kind == "train"
    hooks: list = []
    if training and privacy is not None:
        # Before loading weights and building the optimizer: fixing a layer replaces its parameters.
        segment, hooks = prepare_stage(privacy, segment, stage=stage, num_stages=plan.num_stages, round=server_round)
    names = list(segment.state_dict())
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ConfigError(f"the {kind} message for stage {stage} is missing arrays {missing[:5]}; the server must send this segment's weights")
    segment.load_state_dict({name: weights[name] for name in names}, strict=True)

    started = time.perf_counter()
    upstream, downstream = _connect(device, plan, stage, kind, server_round, timeouts)
    runner = StageRunner(
        segment,
        stage=stage,
        num_stages=plan.num_stages,
        args_spec=split.boundaries[stage - 1].args_spec if stage > 0 else None,
        upstream=upstream,
        downstream=downstream,
        optimizer=build_optimizer(optimizer, segment.parameters()) if training and optimizer else None,
        schedule=plan.schedule,
        loss_fn=build_loss(loss) if stage == plan.num_stages - 1 else None,
        round=server_round,
        hooks=hooks,
    )
    try:
        steps = _drive(runner, batches, plan.num_microbatches, training) if stage == 0 else runner.serve()
        state = {name: value.detach().clone() for name, value in segment.state_dict().items()}
        for hook in hooks:
            if hasattr(hook, "finish_round"):
                # Household-level DP clips the round update over all stages, so the links must still be open.
                state = hook.finish_round(runner, weights, state)
    except BaseException as exc:
        runner.close(error=exc)
        raise
    runner.close()
    bytes_sent = sum(link.bytes_sent for link in (upstream, downstream) if link is not None)
    report = hooks[0].report() if hooks else None
    for hook in hooks:
        if hasattr(hook, "close"):
            hook.close()
    return StageOutcome(
        state=state, steps=steps, bytes_sent=bytes_sent, seconds=time.perf_counter() - started, privacy=report
    )


def _drive(runner: StageRunner, batches: Iterable[tuple[Any, Any]], num_microbatches: int, training: bool) -> list[StepResult]:
    step = runner.train_step if training else runner.eval_step
    results = [step(inputs, targets, num_microbatches=num_microbatches) for inputs, targets in batches]
    runner.finish()
    return results
