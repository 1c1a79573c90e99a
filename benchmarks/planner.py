"""Planner prediction benchmark: predicted against measured step time, planned against even split.

For each model and each stage count (2 and 3), one device of the household is
slow: its stage process runs in a cgroup v1 ``cpu`` group whose
``cpu.cfs_quota_us`` is 25% of ``cpu.cfs_period_us``, so the planner gets
speed 0.25 for it. The other devices have speed 1.0, the speed of this machine
with one torch thread. The benchmark then

1. puts every device in its own network namespace, joins each pair with a
   veth pair shaped by ``tc tbf`` to 200 Mbit/s (see shaped_links.py), and
   measures every pair with `homesplit.planner.linkprobe`;
2. profiles the model in this process with one torch thread, as the stage
   processes run, at every micro-batch size the planner may choose
   (`profile_model`). It also measures the stage runtime's cost per
   micro-batch (`measure_stage_overhead`, a real two-stage pipeline of a
   trivial model);
3. calibrates: one stage process runs the whole model with each candidate
   micro-batch count (4 and 8), and every unit's time at that micro-batch
   size is scaled so that the cost model, runtime overhead included,
   predicts that run;
4. plans the household with `plan_household` (stage 0 pinned to a fast device,
   which holds the data);
5. runs the planned pipeline and an even split, one process per stage with
   `run_local_pipeline`, each stage in its device's namespace. The even split
   gives every stage the same reference compute, on the same devices with the
   slow one second, and the same micro-batch count;
6. reports the median step time of stage 0 after the warm-up steps, the
   predicted step time with and without the runtime overhead term, and the
   speed-up of the planned split over the even one.

Where no cgroup v1 ``cpu`` controller is writable, the slow stage is instead
stopped and continued with SIGSTOP and SIGCONT for 75% of every 100 ms, and
the output says so under ``slowdown``. Where the namespaces cannot be
created, the stages talk over loopback TCP, and ``network`` in the output
records that and the reason. The namespaces are deleted afterwards in every case.

Run (as root, for the cgroup and the namespaces)::

    python benchmarks/planner.py [--quick] [--models cnn transformer]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from shaped_links import ShapedNetwork, measure_pair_links, shaped_network

from homesplit.job import PipelineJob
from homesplit.local import run_local_pipeline
from homesplit.planner import DeviceProfile, LinkTable, plan_household
from homesplit.planner.costs import CostModel
from homesplit.planner.linkprobe import measure_link_pair
from homesplit.planner.profile import profile_model
from homesplit.transport import PeerIdentity, TcpTransport, open_listener

SLOW_SPEED = 0.25
CFS_PERIOD_US = 100_000
# Weight of the benchmark's cgroups against the default 1024 of everything else.
CPU_SHARES = 65536
CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
RUN_DEADLINE_SECONDS = 300.0
WARMUP_STEPS = 2
# Micro-batch counts the planner may choose; the calibration runs each of them.
MICROBATCH_CANDIDATES = (4, 8)
# Every device the benchmark's households use: 2 stages use fast0 and slow.
DEVICES = ("fast0", "fast1", "slow")

MODELS = {
    "cnn": {
        "description": "household-digits CNN (homesplit.models:groupnorm_cnn) on 1x8x8 images",
        "model": "homesplit.models:groupnorm_cnn",
        "model_kwargs": {},
        "data": "homesplit.datasets:random_images",
        "data_kwargs": {},
        "sample_shape": [1, 8, 8],
        "dtype": "float32",
        "batch_size": 512,
    },
    "transformer": {
        "description": "tiny_transformer with dim 64, 4 blocks, 32 tokens",
        "model": "homesplit.models:tiny_transformer",
        "model_kwargs": {"dim": 64, "heads": 4, "depth": 4, "max_len": 32, "vocab": 64},
        "data": "homesplit.datasets:random_tokens",
        "data_kwargs": {"length": 32, "vocab": 64},
        "sample_shape": [32],
        "dtype": "int64",
        "batch_size": 64,
    },
}


def _find_cgroup_cpu_root() -> Path | None:
    """Return the cgroup v1 ``cpu`` mount if this process may create groups in it."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            root = Path(fields[1])
            if (root / "cpu.cfs_quota_us").exists() and os.access(root, os.W_OK):
                return root
    return None


@contextlib.contextmanager
def slowed(fraction: float) -> Iterator[tuple[dict, callable]]:
    """Yield (description, slow(pid)): slow(pid) limits process `pid` to `fraction` of one CPU.

    With cgroups, this process and the stage processes it starts run in a
    group with a high ``cpu.shares``, so that other work on the machine
    disturbs the measurement less. The slow stage moves into a second group
    that also has the quota. Both groups are removed on exit. Without
    cgroups, a thread stops and continues the slow process instead.
    """
    root = _find_cgroup_cpu_root()
    if root is not None:
        fast = root / f"homesplit-bench-{os.getpid()}-fast"
        slow = root / f"homesplit-bench-{os.getpid()}-slow"
        fast.mkdir()
        slow.mkdir()
        try:
            for group in (fast, slow):
                (group / "cpu.shares").write_text(str(CPU_SHARES))
            (slow / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (slow / "cpu.cfs_quota_us").write_text(str(int(CFS_PERIOD_US * fraction)))
            (fast / "cgroup.procs").write_text(str(os.getpid()))
            info = {
                "method": "cgroup v1 cpu",
                "quota_us": int(CFS_PERIOD_US * fraction),
                "period_us": CFS_PERIOD_US,
                "cpu_shares": CPU_SHARES,
            }
            yield info, lambda pid: (slow / "cgroup.procs").write_text(str(pid))
        finally:
            (root / "cgroup.procs").write_text(str(os.getpid()))
            # The stage processes have exited, so the groups are empty and can go.
            for group in (slow, fast):
                for _ in range(50):
                    try:
                        group.rmdir()
                        break
                    except OSError:
                        time.sleep(0.1)
        return

    stop = threading.Event()
    targets: list[int] = []

    def duty_cycle() -> None:
        while not stop.is_set():
            for pid in list(targets):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stop.wait(CFS_PERIOD_US * (1 - fraction) / 1e6)
            for pid in list(targets):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            stop.wait(CFS_PERIOD_US * fraction / 1e6)

    thread = threading.Thread(target=duty_cycle, daemon=True)
    thread.start()
    info = {"method": "fallback: SIGSTOP/SIGCONT duty cycle, no writable cgroup v1 cpu controller", "fraction": fraction}
    try:
        yield info, targets.append
    finally:
        stop.set()
        thread.join(5)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def measure_loopback_link() -> LinkTable:
    """Measure a TCP link on 127.0.0.1 and use it for every device pair."""
    transport = TcpTransport()
    listener = open_listener("127.0.0.1:0")
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    up, down = PeerIdentity("a", 0, "bench"), PeerIdentity("b", 1, "bench")
    accepted: dict = {}
    thread = threading.Thread(target=lambda: accepted.setdefault("link", transport.accept(listener, local=down, expect=up)))
    thread.start()
    dialed = transport.dial(address, local=up, expect=down)
    thread.join(30)
    listener.close()
    try:
        link = measure_link_pair(dialed, accepted["link"], large_bytes=256 << 10)
    finally:
        dialed.close()
        accepted["link"].close()
    return LinkTable(default=link)


def even_bounds(seconds: list[float], num_stages: int) -> list[int]:
    """Return unit bounds that minimise the largest per-stage reference compute."""
    n = len(seconds)
    best: tuple[float, list[int]] | None = None
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = [0, *cuts, n]
        largest = max(sum(seconds[bounds[s] : bounds[s + 1]]) for s in range(num_stages))
        if best is None or largest < best[0]:
            best = (largest, bounds)
    return best[1]


def run_pipeline(
    spec: dict, *, cuts: list[str], devices: list[str], num_microbatches: int, steps: int, slow: callable, workdir: Path,
    network: ShapedNetwork | None,
) -> dict:
    """Run one pipeline with the slow device's stage slowed; return stage 0's step times.

    With a `network`, each stage runs in its device's namespace and links to
    its neighbours over the shaped veth pairs; without one, over loopback.
    """
    job = PipelineJob(
        model=spec["model"],
        model_kwargs=spec["model_kwargs"],
        example_shape=[1, *spec["sample_shape"]],
        example_dtype=spec["dtype"],
        cuts=cuts,
        data=spec["data"],
        data_kwargs={**spec["data_kwargs"], "steps": steps, "batch_size": spec["batch_size"]},
        num_microbatches=num_microbatches,
        schedule="1f1b",
        optimizer={"name": "Adam", "lr": 1e-3},
        devices=devices,
    )
    torch.manual_seed(0)
    state = job.build_model(device="cpu").state_dict()

    def started(processes) -> None:
        if "slow" in devices:
            slow(processes[devices.index("slow")].pid)

    placement = {}
    if network is not None:
        placement = {
            "stage_prefixes": [network.prefix(device) for device in devices],
            "listen_addresses": [network.listen_address(devices[k + 1], devices[k]) for k in range(len(devices) - 1)],
        }
    run = run_local_pipeline(
        job, state, workdir=workdir, threads=1, started=started, deadline=RUN_DEADLINE_SECONDS, **placement
    )
    seconds = [step["seconds"] for step in run.reports[0]["steps"]][WARMUP_STEPS:]
    return {
        "cuts": cuts,
        "devices": devices,
        "num_microbatches": num_microbatches,
        "step_seconds_median": statistics.median(seconds),
        "step_seconds": [round(value, 5) for value in seconds],
        "peak_rss_bytes": [report["peak_rss_bytes"] for report in run.reports],
    }


def _calibrated(layer, factors: dict[int, float]):
    """Return `layer` with only the calibrated micro-batch sizes, each time scaled by its factor."""
    by_size = {size: layer.seconds_per_sample_at(size) * factor for size, factor in factors.items()}
    largest = max(by_size)
    return dataclasses.replace(layer, seconds_per_sample=by_size[largest], seconds_per_sample_by_microbatch=by_size)


def _bounds_of(plan, layers: list) -> list[int]:
    """Return the unit bounds of `plan`'s stages, for the cost model."""
    names = [layer.name for layer in layers]
    return [*(names.index(stage.layers[0]) for stage in plan.stages), len(layers)]


def bench_model(
    name: str, *, num_stages: int, steps: int, links: LinkTable, slow: callable, workdir: Path,
    network: ShapedNetwork | None,
) -> dict:
    spec = MODELS[name]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PipelineJob(
        model=spec["model"], model_kwargs=spec["model_kwargs"], example_shape=[1], cuts=[], data=spec["data"]
    ).build_model(device="cpu").train()
    if spec["dtype"] == "int64":
        example = torch.randint(1, spec["data_kwargs"]["vocab"], (spec["batch_size"], *spec["sample_shape"]))
    else:
        example = torch.randn(spec["batch_size"], *spec["sample_shape"])
    profile = profile_model(model, (example,), repeats=9, measure_overhead=True)
    overhead = profile.stage_overhead_seconds
    batch_size = spec["batch_size"]

    # Calibration: one stage process runs the whole model with each candidate
    # micro-batch count M. The cost model predicts that run as
    # batch * sum(t(b)) * factor(b) + M * overhead, with t(b) the profile's
    # time per sample at the run's micro-batch size b. So factor(b) makes it
    # exact, and it scales every unit's time at that size. It brings the profile
    # to what a stage process measures under the machine's current load, at
    # the sizes the planner compares. A single factor would carry one size's
    # error over to the other.
    calibration = {}
    for count in MICROBATCH_CANDIDATES:
        single = run_pipeline(
            spec, cuts=[], devices=["fast0"], num_microbatches=count, steps=steps, slow=slow,
            workdir=workdir / f"{name}-{num_stages}-calibration-{count}", network=network,
        )  # fmt: skip
        size = math.ceil(batch_size / count)
        raw = sum(layer.seconds_per_sample_at(size) for layer in profile.layers) * batch_size
        runs = math.ceil(batch_size / size)
        factor = (single["step_seconds_median"] - runs * overhead) / raw
        if factor <= 0:
            raise RuntimeError(
                f"calibration failed for {name}: the one-stage step of {single['step_seconds_median']:.4g} s at "
                f"{count} micro-batches is shorter than {runs} micro-batches of stage overhead ({overhead:.4g} s "
                f"each); rerun on a quieter machine"
            )
        calibration[size] = {
            "num_microbatches": count,
            "step_seconds": single["step_seconds_median"],
            "profile_step_seconds": raw,
            "factor": factor,
            # The calibration as it was before the overhead term: all of the run goes into the units.
            "factor_without_overhead": single["step_seconds_median"] / raw,
        }
    layers = [_calibrated(layer, {size: c["factor"] for size, c in calibration.items()}) for layer in profile.layers]
    old_layers = [
        _calibrated(layer, {size: c["factor_without_overhead"] for size, c in calibration.items()})
        for layer in profile.layers
    ]

    fast = [f"fast{k}" for k in range(num_stages - 1)]
    devices = [DeviceProfile(name=f, speed=1.0, memory_bytes=1 << 34) for f in fast]
    devices.append(DeviceProfile(name="slow", speed=SLOW_SPEED, memory_bytes=1 << 34))
    plan = plan_household(
        layers, devices, links, batch_size=batch_size, microbatch_candidates=MICROBATCH_CANDIDATES, data_owner="fast0",
        stage_overhead_seconds=overhead,
    )  # fmt: skip

    order = [devices[0], devices[-1], *devices[1:-1]]
    bounds = even_bounds([layer.seconds_per_sample for layer in layers], num_stages)
    even_cuts = [layers[b - 1].cut for b in bounds[1:-1]]
    costs = CostModel(
        layers, devices, links, batch_size=batch_size, schedule="1f1b", optimizer="adam", stage_overhead_seconds=overhead
    )
    old_costs = CostModel(old_layers, devices, links, batch_size=batch_size, schedule="1f1b", optimizer="adam")
    planned_order = [next(d for d in devices if d.name == stage.device) for stage in plan.stages]
    planned_bounds = _bounds_of(plan, layers)
    even_predicted = costs.step_cost(bounds, order, num_microbatches=plan.num_microbatches).step_seconds

    planned = run_pipeline(
        spec, cuts=plan.cuts, devices=plan.devices, num_microbatches=plan.num_microbatches, steps=steps, slow=slow,
        workdir=workdir / f"{name}-{num_stages}-planned", network=network,
    )  # fmt: skip
    even = run_pipeline(
        spec, cuts=even_cuts, devices=[d.name for d in order], num_microbatches=plan.num_microbatches, steps=steps,
        slow=slow, workdir=workdir / f"{name}-{num_stages}-even", network=network,
    )  # fmt: skip
    old_plan = plan_household(
        old_layers, devices, links, batch_size=batch_size, microbatch_candidates=MICROBATCH_CANDIDATES,
        data_owner="fast0"
    )
    planned["predicted_step_seconds"] = plan.step_seconds
    planned["prediction_error"] = plan.step_seconds / planned["step_seconds_median"] - 1
    planned["predicted_step_seconds_without_overhead"] = old_costs.step_cost(
        planned_bounds, planned_order, num_microbatches=plan.num_microbatches
    ).step_seconds
    planned["prediction_error_without_overhead"] = (
        planned["predicted_step_seconds_without_overhead"] / planned["step_seconds_median"] - 1
    )
    planned["plan_without_overhead"] = {
        "cuts": old_plan.cuts, "devices": old_plan.devices, "num_microbatches": old_plan.num_microbatches,
        "predicted_step_seconds": old_plan.step_seconds,
    }  # fmt: skip
    planned["plan"] = plan.to_dict()
    even["predicted_step_seconds"] = even_predicted
    even["prediction_error"] = even_predicted / even["step_seconds_median"] - 1
    even["predicted_step_seconds_without_overhead"] = old_costs.step_cost(
        bounds, order, num_microbatches=plan.num_microbatches
    ).step_seconds
    even["prediction_error_without_overhead"] = (
        even["predicted_step_seconds_without_overhead"] / even["step_seconds_median"] - 1
    )
    return {
        "model": name,
        "description": spec["description"],
        "devices": {d.name: d.speed for d in devices},
        "batch_size": batch_size,
        "stage_overhead_seconds": overhead,
        "profile_seconds_per_sample_by_microbatch": {
            size: sum(layer.seconds_per_sample_at(size) for layer in profile.layers)
            for size in sorted(profile.layers[0].seconds_per_sample_by_microbatch)
        },
        "calibration": calibration,
        "planned": planned,
        "even": even,
        "speedup_planned_over_even": even["step_seconds_median"] / planned["step_seconds_median"],
    }


def machine() -> dict:
    model_name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model_name,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }


def _exit_on_sigterm(signum: int, frame) -> None:
    # SystemExit unwinds the context managers, which delete the namespaces and cgroups.
    sys.exit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--steps", type=int, default=14, help="mini-batches per run, the first 2 of them warm-up (default: 14)")
    parser.add_argument("--quick", action="store_true", help="8 steps per run")
    parser.add_argument("--loopback", action="store_true", help="skip the network namespaces and link the stages over loopback TCP")
    args = parser.parse_args()
    steps = 8 if args.quick else args.steps
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    results = {"machine": machine(), "threads_per_stage": 1, "warmup_steps": WARMUP_STEPS, "runs": []}
    with contextlib.ExitStack() as stack:
        network, reason = (None, "--loopback was given") if args.loopback else stack.enter_context(shaped_network(DEVICES))
        if network is not None:
            measured = measure_pair_links(network)
            links = LinkTable(links=measured)
            results["network"] = {"method": network.describe()}
            results["links"] = [{"between": list(pair), **link.to_dict()} for pair, link in measured.items()]
        else:
            links = measure_loopback_link()
            results["network"] = {"method": "fallback: loopback TCP, no shaped links", "reason": reason}
            results["links"] = [{"between": "every pair", **links.default.to_dict()}]
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="homesplit-bench-planner-"))
        info, slow = stack.enter_context(slowed(SLOW_SPEED))
        results["slowdown"] = info
        for name in args.models:
            for num_stages in args.stages:
                results["runs"].append(
                    bench_model(
                        name, num_stages=num_stages, steps=steps, links=links, slow=slow, workdir=Path(work),
                        network=network,
                    )
                )  # fmt: skip
    results["machine"]["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
