"""Entry point of one stage process: ``python -m homesplit.worker``.

Tests, benchmarks and `homesplit.local` start one such process per stage, each
standing in for a device. The process reads a `PipelineJob`, builds only its
own segment (the full model is a skeleton on the ``meta`` device), loads its
initial weights, connects to its neighbours and trains. It writes its final
weights and a JSON report next to each other, and exits 0 on success.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from homesplit.allocator import pin_mmap_threshold
from homesplit.errors import ConfigError
from homesplit.job import PipelineJob, build_loss, build_optimizer, build_split, load_callable
from homesplit.json_limits import loads_limited
from homesplit.link import Link, LinkTimeouts
from homesplit.stage import StageRunner, StepResult
from homesplit.tensorfile import load_tensors, save_tensors
from homesplit.transport import PeerIdentity, TcpTransport, open_listener

__all__ = ["make_transport", "run_stage", "main"]

logger = logging.getLogger(__name__)


def make_transport(kind: str, *, bundle: str | None, timeouts: LinkTimeouts):
    """Return the transport for `kind` ("tcp" or "tls")."""
    if kind == "tcp":
        return TcpTransport(timeouts=timeouts)
    if kind == "tls":
        if not bundle:
            raise ConfigError("transport 'tls' needs --bundle, the device bundle folder")
        from homesplit.tls import TlsTransport

        return TlsTransport.from_bundle(bundle, timeouts=timeouts)
    raise ConfigError(f"transport {kind!r} is unknown; use 'tcp' or 'tls'")


def connect_stage(
    job: PipelineJob, stage: int, transport, *, listener: socket.socket | None, next_address: str | None
) -> tuple[Link | None, Link | None]:
    """Dial the downstream stage (if any), then accept the upstream one on `listener` (if any)."""
    me = PeerIdentity(job.devices[stage], stage, job.household, job.round)
    upstream = downstream = None
    if stage > 0 and listener is None:
        raise ConfigError(f"stage {stage} needs a listen address for its upstream neighbour")
    try:
        if stage < job.num_stages - 1:
            if not next_address:
                raise ConfigError(f"stage {stage} needs the address of stage {stage + 1}")
            peer = PeerIdentity(job.devices[stage + 1], stage + 1, job.household, job.round)
            downstream = transport.dial(next_address, local=me, expect=peer)
        if stage > 0:
            peer = PeerIdentity(job.devices[stage - 1], stage - 1, job.household, job.round)
            upstream = transport.accept(listener, local=me, expect=peer)
    except BaseException:
        if downstream is not None:
            downstream.close(reason=f"stage {stage} could not connect upstream")
        raise
    return upstream, downstream


def run_stage(
    job: PipelineJob,
    stage: int,
    weights: dict[str, torch.Tensor],
    upstream: Link | None,
    downstream: Link | None,
) -> tuple[dict[str, torch.Tensor], list[StepResult]]:
    """Train this stage's segment for the whole job and return its final weights and step results."""
    split = build_split(job, device="meta")
    segment = split.segments[stage]
    segment.to_empty(device="cpu")
    hooks: list = []
    if job.privacy is not None:
        from homesplit.privacy.attach import prepare_stage

        segment, hooks = prepare_stage(job.privacy, segment, stage=stage, num_stages=job.num_stages, round=job.round)
    missing = set(segment.state_dict()) - set(weights)
    if missing:
        raise ConfigError(f"initial weights for stage {stage} lack {sorted(missing)[:5]}")
    # Without DP hooks the loaded tensors become the parameters, so the stage
    # keeps one set of weights, not two. DP hooks need the segment to keep its
    # parameter objects: sample-level DP hooked them before loading, and
    # household-level DP compares the final weights with the initial ones.
    segment.load_state_dict({k: weights[k] for k in segment.state_dict()}, strict=True, assign=not hooks)
    # A segment without parameters (a lone activation, say) has nothing to step.
    has_parameters = any(True for _ in segment.parameters())
    optimizer = build_optimizer(job.optimizer, segment.parameters()) if has_parameters else None
    runner = StageRunner(
        segment,
        stage=stage,
        num_stages=job.num_stages,
        args_spec=split.boundaries[stage - 1].args_spec if stage > 0 else None,
        upstream=upstream,
        downstream=downstream,
        optimizer=optimizer,
        schedule=job.schedule,
        loss_fn=build_loss(job.loss) if stage == job.num_stages - 1 else None,
        round=job.round,
        hooks=hooks,
    )
    try:
        if stage == 0:
            results = []
            data = load_callable(job.data)(**job.data_kwargs)
            for index, (inputs, targets) in enumerate(data):
                if job.max_steps is not None and index >= job.max_steps:
                    break
                results.append(runner.train_step(inputs, targets, num_microbatches=job.num_microbatches))
            runner.finish()
        else:
            results = runner.serve()
        # No clone: training is over, and a copy would add a full set of
        # weights at the moment gradients and optimizer state still exist.
        final = {k: v.detach() for k, v in segment.state_dict().items()}
        for hook in hooks:
            if hasattr(hook, "finish_round"):
                # Household-level DP clips the round update over all stages, so the links must still be open.
                final = hook.finish_round(runner, weights, final)
    except BaseException as exc:
        runner.close(error=exc)
        raise
    runner.close()
    return final, results


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m homesplit.worker", description="Run one pipeline stage.")
    parser.add_argument(
        "--job", required=True, help="path of a JSON file with a PipelineJob, or a list of them to run in turn"
    )
    parser.add_argument("--stage", type=int, required=True, help="stage index of this process")
    parser.add_argument(
        "--weights", required=True, help="initial weights: PREFIX.tensors for one job, PREFIX-I.tensors for job I of a list"
    )
    parser.add_argument(
        "--out", required=True, help="output prefix: writes PREFIX.tensors and PREFIX.json (PREFIX-I.* for a list)"
    )
    parser.add_argument("--listen", help="HOST:PORT or fd:N to accept the upstream stage on")
    parser.add_argument("--next", dest="next_address", help="HOST:PORT of the downstream stage")
    parser.add_argument("--transport", default="tcp", choices=["tcp", "tls"], help="link transport (default: tcp)")
    parser.add_argument("--bundle", help="device bundle folder, for --transport tls")
    parser.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for neighbours")
    parser.add_argument("--recv-timeout", type=float, default=300.0, help="seconds to wait for one frame")
    parser.add_argument("--peer-silence", type=float, default=15.0, help="seconds of silence before a peer counts as gone")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="give freed tensor memory back to the system at once, so peak RSS follows the live tensors; "
        "costs page faults on every allocation above 128 KiB",
    )
    return parser.parse_args(argv)


def _read_job_file(path: str) -> Any:
    """Decode the job file: one PipelineJob object or a list of them."""
    try:
        return loads_limited(Path(path).read_text())
    except ValueError as exc:
        raise ConfigError(f"job file {path!r} is not valid JSON: {exc}; write it with PipelineJob.to_json") from exc


def _run_one(job: PipelineJob, args: argparse.Namespace, transport, listener, weights: str, out: str) -> int:
    report: dict[str, Any] = {"stage": args.stage, "pid": os.getpid(), "round": job.round}
    start = time.perf_counter()
    upstream = downstream = None
    try:
        upstream, downstream = connect_stage(job, args.stage, transport, listener=listener, next_address=args.next_address)
        state, results = run_stage(job, args.stage, load_tensors(weights), upstream, downstream)
        save_tensors(f"{out}.tensors", state)
        report["steps"] = [vars(r) for r in results]
        report["bytes_sent"] = sum(link.bytes_sent for link in (upstream, downstream) if link is not None)
        report["bytes_received"] = sum(link.bytes_received for link in (upstream, downstream) if link is not None)
        code = 0
    except Exception as exc:
        logger.error("Stage %d failed: %s", args.stage, exc)
        for link in (upstream, downstream):
            if link is not None:
                link.close(reason=f"stage {args.stage} failed: {exc}")
        report["error"] = f"{type(exc).__name__}: {exc}"
        code = 1
    report["seconds"] = time.perf_counter() - start
    # Wall-clock time, so that a parent can compare when each stage stopped.
    report["finished_at"] = time.time()
    report["peak_rss_bytes"] = _peak_rss_bytes()
    Path(f"{out}.json").write_text(json.dumps(report))
    return code


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process in bytes, from VmHWM.

    getrusage's ru_maxrss is no use here: Linux carries the parent's peak
    across exec, so a small stage started by a large parent reports the
    parent's figure.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one stage as a process for one job or a list of jobs; return the exit code."""
    args = _parse_args(argv)
    if args.return_freed_memory:
        # Before any tensor exists, so that freed tensors never linger on the heap.
        pin_mmap_threshold()
    logging.basicConfig(
        level=os.environ.get("HOMESPLIT_LOG_LEVEL", "INFO"),
        format=f"%(levelname)s stage{args.stage} %(name)s: %(message)s",
    )
    torch.set_num_threads(args.threads)
    listener = None
    try:
        raw = _read_job_file(args.job)
        jobs = [PipelineJob.from_json(json.dumps(j)) for j in raw] if isinstance(raw, list) else [PipelineJob.from_json(json.dumps(raw))]
        timeouts = LinkTimeouts(connect=args.connect_timeout, recv=args.recv_timeout, peer_silence=args.peer_silence)
        transport = make_transport(args.transport, bundle=args.bundle, timeouts=timeouts)
        listener = open_listener(args.listen) if args.listen else None
    except Exception as exc:
        logger.error("Stage %d could not start: %s", args.stage, exc)
        Path(f"{args.out}.json").write_text(json.dumps({"stage": args.stage, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    try:
        if not isinstance(raw, list):
            return _run_one(jobs[0], args, transport, listener, f"{args.weights}.tensors", args.out)
        for index, job in enumerate(jobs):
            code = _run_one(job, args, transport, listener, f"{args.weights}-{index}.tensors", f"{args.out}-{index}")
            if code:
                # The neighbours stop too, so later jobs could not connect.
                return code
        return 0
    finally:
        if listener is not None:
            listener.close()


if __name__ == "__main__":
    sys.exit(main())
