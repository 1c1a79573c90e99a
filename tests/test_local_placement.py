"""Tests of running local stage processes behind a command prefix, on given listen addresses."""

from __future__ import annotations

import socket

import torch

from homesplit.job import PipelineJob
from homesplit.local import run_local_pipeline, train_reference


def test_pipeline_runs_behind_prefix_and_address(tmp_path):
    # A port that was free a moment ago. A process that takes it first makes the
    # stage fail to bind, so the test fails rather than passing wrongly.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = PipelineJob(
        model="homesplit.models:mlp",
        model_kwargs={"in_features": 8, "hidden": 8, "depth": 2, "classes": 2},
        example_shape=[1, 8],
        cuts=["2"],
        data="homesplit.datasets:random_classification",
        data_kwargs={"steps": 3, "batch_size": 8, "features": 8, "classes": 2},
        num_microbatches=2,
    )
    torch.manual_seed(0)
    state = job.build_model(device="cpu").state_dict()
    pids = []

    run = run_local_pipeline(
        job,
        state,
        workdir=tmp_path,
        stage_prefixes=[["env"], ["env", "HOMESPLIT_TEST_PREFIX=1"]],
        listen_addresses=[f"127.0.0.1:{port}"],
        started=lambda processes: pids.extend(process.pid for process in processes),
        deadline=120.0,
    )
    reference, _ = train_reference(job, state)

    # env execs the stage, so the process started is the stage itself.
    assert [report["pid"] for report in run.reports] == pids
    for key, expected in reference.items():
        torch.testing.assert_close(run.state[key], expected, rtol=0, atol=1e-5)
