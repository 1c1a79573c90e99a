"""A pipeline whose peer dies, falls silent or misbehaves stops with a clear error, never hangs."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from torch import nn

from homesplit.errors import ScheduleError
from homesplit.job import PipelineJob
from homesplit.local import PipelineRunError, run_local_pipeline
from homesplit.stage import StageRunner
from homesplit.transport import PeerIdentity, TcpTransport, open_listener
from homesplit.wire import Frame, FrameKind


def long_job() -> PipelineJob:
    return PipelineJob(
        model="homesplit.models:mlp",
        model_kwargs={"hidden": 256, "depth": 6},
        example_shape=[1, 32],
        cuts=["4", "8"],
        data="homesplit.datasets:random_classification",
        # About 15 s of training on two idle cores; the data is built up front, so keep it small.
        data_kwargs={"steps": 3000, "batch_size": 64},
        num_microbatches=4,
        devices=["phone", "laptop", "tv"],
    )


def wait_for_text(path, text, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


def run_and_signal(tmp_path, *, stage: int, signum: int, peer_silence: float, deadline: float) -> tuple[dict, float]:
    """Run `long_job`, send `signum` to one stage once it is training, and return the reports and the signal time."""
    job = long_job()
    signalled = {}

    def signal_stage(processes):
        def run():
            wait_for_text(tmp_path / f"stage{stage}.log", "Accepted", 60)
            time.sleep(1.0)  # well inside training
            signalled["at"] = time.time()
            os.kill(processes[stage].pid, signum)

        threading.Thread(target=run, daemon=True).start()

    with pytest.raises(PipelineRunError) as failure:
        run_local_pipeline(
            job,
            job.build_model().state_dict(),
            workdir=tmp_path,
            peer_silence=peer_silence,
            deadline=deadline,
            extra_env={"HOMESPLIT_LOG_LEVEL": "DEBUG"},
            started=signal_stage,
        )
    return {r["stage"]: r for r in failure.value.reports}, signalled["at"]


@pytest.mark.slow
def test_killed_stage_stops_the_others(tmp_path):
    reports, killed_at = run_and_signal(tmp_path, stage=1, signum=signal.SIGKILL, peer_silence=5.0, deadline=120)
    assert reports[1]["returncode"] == -signal.SIGKILL
    for survivor in (0, 2):
        assert reports[survivor]["returncode"] == 1
        assert "laptop" in reports[survivor]["error"], reports[survivor]["error"]
        # A killed peer closes its sockets, so survivors stop well before the 5 s silence deadline.
        stopped_after = reports[survivor]["finished_at"] - killed_at
        assert stopped_after < 5.0, f"stage {survivor} stopped {stopped_after:.1f} s after the kill"


@pytest.mark.slow
def test_silent_stage_times_out(tmp_path):
    reports, frozen_at = run_and_signal(tmp_path, stage=2, signum=signal.SIGSTOP, peer_silence=3.0, deadline=40)
    assert reports[1]["returncode"] == 1
    assert "tv" in reports[1]["error"], reports[1]["error"]
    assert "sent nothing" in reports[1]["error"], reports[1]["error"]
    assert reports[0]["returncode"] == 1
    assert "tv" in reports[0]["error"], reports[0]["error"]
    # The silence deadline is 3 s; allow for heartbeats already in flight and a loaded machine.
    for survivor in (0, 1):
        stopped_after = reports[survivor]["finished_at"] - frozen_at
        assert stopped_after < 3.0 + 7.0, f"stage {survivor} stopped {stopped_after:.1f} s after the freeze"


def connected_pair():
    """Two in-process stages joined by a real loopback link: (upstream link, downstream link)."""
    transport = TcpTransport()
    listener = open_listener("127.0.0.1:0")
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    first, second = PeerIdentity("phone", 0), PeerIdentity("laptop", 1)
    accepted = {}
    thread = threading.Thread(target=lambda: accepted.setdefault("link", transport.accept(listener, local=second, expect=first)))
    thread.start()
    dialed = transport.dial(address, local=first, expect=second)
    thread.join(timeout=30)
    listener.close()
    return dialed, accepted["link"]


def run_in_thread(fn):
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_wrong_microbatch_is_a_schedule_error():
    up, down = connected_pair()
    segment = nn.Linear(4, 3)
    from torch.utils import _pytree as pytree

    _, spec = pytree.tree_flatten((torch.zeros(1),))
    runner = StageRunner(segment, stage=1, num_stages=2, args_spec=spec, upstream=down,
                         optimizer=torch.optim.SGD(segment.parameters(), lr=0.1), loss_fn=nn.functional.cross_entropy)  # fmt: skip
    thread, outcome = run_in_thread(runner.serve)
    up.send(Frame(FrameKind.STEP, torch.tensor([4, 2, 0]), step=0))
    up.send(Frame(FrameKind.ACTIVATION, torch.randn(2, 4), step=0, microbatch=1))
    thread.join(timeout=30)
    error = outcome.get("error")
    assert isinstance(error, ScheduleError), outcome
    assert "micro-batch 0" in str(error), str(error)
    assert "micro-batch 1" in str(error), str(error)
    up.close()
    down.close()


def test_evaluation_keeps_no_activations():
    torch.manual_seed(0)
    first, second = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 3)
    up, down = connected_pair()
    from torch.utils import _pytree as pytree

    _, spec = pytree.tree_flatten((torch.zeros(1),))
    graphs = []
    for module in (first, second):
        module.register_forward_hook(lambda _m, _i, out: graphs.append(out.grad_fn))
    lead = StageRunner(first, stage=0, num_stages=2, downstream=up, optimizer=torch.optim.SGD(first.parameters(), lr=0.1))
    tail = StageRunner(second, stage=1, num_stages=2, args_spec=spec, upstream=down, loss_fn=nn.functional.cross_entropy)
    thread, outcome = run_in_thread(tail.serve)
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    lead.eval_step(x, y, num_microbatches=3)
    lead.finish()
    thread.join(timeout=30)
    results = outcome["value"]
    assert graphs and all(g is None for g in graphs)
    expected = nn.functional.cross_entropy(second(first(x)), y).item()
    assert results[0].loss_sum / 10 == pytest.approx(expected, abs=1e-6)
    assert results[0].correct == int((second(first(x)).argmax(1) == y).sum())
    up.close()
    down.close()
