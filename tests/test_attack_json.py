"""Deeply nested JSON from the server, a peer device or a stage process.

`json.loads` raises RecursionError, not JSONDecodeError, on ``"[" * 100000``.
Every decoder of JSON that crossed a process or device boundary must raise
its own homesplit error with a short message instead, and so must the
ClientApp's error reply and the server's link probe step.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from homesplit.clients import DeviceData, device_app
from homesplit.clients.privacy import load_budget, read_round_privacy
from homesplit.errors import ConfigError, PlanError, PrivacyError
from homesplit.household_plan import HouseholdPlan, StageAssignment
from homesplit.job import PipelineJob
from homesplit.json_limits import MAX_JSON_DEPTH, loads_limited
from homesplit.link_probes import LinkProbeRequest, decode_results
from homesplit.pki import Household
from homesplit.planner.plan import Plan
from homesplit.planner.profile import _read_cache
from homesplit.privacy.settings import check_settings, decode_run_config, resolve_round
from homesplit.records import ARRAYS, CONFIG, LINK_PROBE, LINKS, PLAN, PRIVACY, QUERY_PROBE_LINKS
from homesplit.strategies.link_probes import _owner_results

# The first two overflow Python's recursion limit in `json.loads`. The third
# is valid JSON that decodes, but it nests deeper than MAX_JSON_DEPTH.
PAYLOADS = [
    pytest.param("[" * 100_000, id="100000-arrays"),
    pytest.param('{"a": ' * 100_000, id="100000-objects"),
    pytest.param("[" * 100 + "]" * 100, id="valid-100-levels"),
]

PROBE_REQUEST = LinkProbeRequest(session=1, owner="laptop", peers=("phone",), addresses=("127.0.0.1:1",), budget_seconds=1.0)
ROUND_SETTINGS = {"target-epsilon": 10.0, "noise-multiplier": 1.0, "expected-batch-size": 10}
JOB = {"model": "homesplit.models:mlp", "example_shape": [1, 4], "cuts": [], "data": "m:f"}


def _round_privacy():
    settings = check_settings(ROUND_SETTINGS, where="privacy")
    return resolve_round(settings, dataset_size=40, batch_size=10, local_epochs=1, num_rounds=3)


def _load_budget(payload: str):
    state = RecordDict({"homesplit-privacy-budget": ConfigRecord({"json": payload})})
    context = Context(run_id=1, node_id=1, node_config={}, state=state, run_config={})
    return load_budget(context, _round_privacy())


# Each public decoder: how it gets the payload, the error it must raise, and text that its message must contain.
DECODERS = [
    pytest.param(
        lambda payload: LinkProbeRequest.from_config({**PROBE_REQUEST.to_config(), "peers": payload}),
        ConfigError, "link probe request's peers are not valid JSON", id="link-probe-peers",
    ),
    pytest.param(
        lambda payload: LinkProbeRequest.from_config({**PROBE_REQUEST.to_config(), "addresses": payload}),
        ConfigError, "link probe request's addresses are not valid JSON", id="link-probe-addresses",
    ),
    pytest.param(decode_results, ConfigError, "link probe results are not JSON", id="link-probe-results"),
    pytest.param(Plan.from_json, PlanError, "plan is not valid JSON", id="planner-plan"),
    pytest.param(HouseholdPlan.from_json, PlanError, "household plan is not valid JSON", id="household-plan"),
    pytest.param(PipelineJob.from_json, ConfigError, "pipeline job is not valid JSON", id="pipeline-job"),
    pytest.param(decode_run_config, ConfigError, "run config privacy=", id="run-config-privacy"),
    pytest.param(
        lambda payload: read_round_privacy({PRIVACY: payload}),
        PrivacyError, "the train message's privacy settings are not valid JSON", id="round-privacy",
    ),
    pytest.param(_load_budget, PrivacyError, "the privacy budget in context.state is not valid JSON", id="budget-state"),
]  # fmt: skip


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("decode, error, message", DECODERS)
def test_decoder_rejects_deep_json(decode, error, message, payload):
    with pytest.raises(error) as caught:
        decode(payload)
    text = str(caught.value)
    assert message in text
    assert "nests" in text
    assert len(text) < 400


def test_loads_limited_depth_boundary():
    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_limited(deepest) is not None
    with pytest.raises(ValueError, match=f"deeper than {MAX_JSON_DEPTH} levels"):
        loads_limited("[" + deepest + "]")


def test_job_deep_model_kwargs_rejected():
    # 600 levels decode within Python's default recursion limit of 1000. But
    # dataclasses.asdict in to_json recurses two frames per level, so it would overflow.
    deep = "[" * 600 + "]" * 600
    text = json.dumps(JOB)[:-1] + f', "model_kwargs": {{"layers": {deep}}}}}'
    with pytest.raises(ConfigError, match=f"nests deeper than {MAX_JSON_DEPTH} levels"):
        PipelineJob.from_json(text)


def test_household_json_deep_is_corrupt(tmp_path):
    Household.create(tmp_path, "smith")
    (tmp_path / "household.json").write_text("[" * 100_000, encoding="utf-8")
    with pytest.raises(ConfigError, match="is corrupt"):
        Household(tmp_path)


def test_profile_cache_deep_is_ignored(tmp_path, caplog):
    cache = tmp_path / "profiles.json"
    cache.write_text("[" * 100_000, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="homesplit.planner.profile"):
        assert _read_cache(cache, "signature") is None
    assert "ignoring unreadable profile cache" in caplog.text


def test_worker_deep_job_file_config_error(tmp_path):
    job = tmp_path / "job.json"
    job.write_text("[" * 100_000, encoding="utf-8")
    out = tmp_path / "stage0"
    command = [sys.executable, "-m", "homesplit.worker", "--job", str(job), "--stage", "0"]
    command += ["--weights", str(tmp_path / "stage0.init"), "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1, finished.stderr
    error = json.loads(out.with_suffix(".json").read_text())["error"]
    assert error.startswith("ConfigError: job file")
    assert "not valid JSON" in error


# -- the ClientApp and the server's link probe step ----------------------------


@pytest.fixture
def task_identity(monkeypatch):
    """Set the run, node and task ids that Flower's Message constructor reads inside a Flower process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3))


def _data(device) -> DeviceData:
    generator = torch.Generator().manual_seed(0)
    return DeviceData(train=(torch.randn(40, 4, generator=generator), torch.randint(0, 3, (40,), generator=generator)))


def _context(tmp_path: Path) -> Context:
    node_config = {
        "household": "home", "device": "laptop", "listen": "127.0.0.1:0", "insecure-links": True,
        "holds-data": True, "rendezvous-dir": str(tmp_path),
    }  # fmt: skip
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={"num-server-rounds": 1})


def _train_message(**changes: str) -> Message:
    stages = [StageAssignment(stage=0, device="laptop", node_id=1, address="127.0.0.1:0")]
    plan = HouseholdPlan(household="home", cuts=[], stages=stages, num_microbatches=1, schedule="gpipe", num_examples=40)
    config = ConfigRecord({PLAN: plan.to_json(), "stage": 0, "server-round": 1, "batch-size": 10, **changes})
    content = RecordDict({ARRAYS: ArrayRecord(_model().state_dict()), CONFIG: config})
    return Message(content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize(
    "key, expected",
    [
        (PLAN, "PlanError: household plan is not valid JSON"),
        (PRIVACY, "PrivacyError: the train message's privacy settings are not valid JSON"),
        ("optimizer", "ConfigError: the message's optimizer is not valid JSON"),
    ],
)
def test_device_app_rejects_deep_train_config(tmp_path, task_identity, key, expected):
    app = device_app(model_fn=_model, example_inputs=lambda: (torch.zeros(1, 4),), load_data=_data)
    reply = app(_train_message(**{key: "[" * 100_000}), _context(tmp_path))
    assert reply.has_error()
    assert expected in reply.error.reason
    assert len(reply.error.reason) < 500


def test_device_app_rejects_deep_probe_request(tmp_path, task_identity):
    app = device_app(model_fn=_model, example_inputs=lambda: (torch.zeros(1, 4),), load_data=_data)
    request = ConfigRecord({**PROBE_REQUEST.to_config(), "peers": "[" * 100_000})
    message = Message(RecordDict({LINK_PROBE: request}), dst_node_id=1, message_type=QUERY_PROBE_LINKS)
    reply = app(message, _context(tmp_path))
    assert reply.has_error()
    assert "ConfigError: link probe request's peers are not valid JSON" in reply.error.reason


def test_server_deep_probe_results_logged(task_identity, caplog):
    request = Message(RecordDict({}), dst_node_id=1, message_type=QUERY_PROBE_LINKS)
    reply = Message(RecordDict({LINKS: ConfigRecord({"measurements": "[" * 100_000})}), reply_to=request)
    with caplog.at_level(logging.WARNING, logger="homesplit.strategies.link_probes"):
        links = _owner_results("home", PROBE_REQUEST, reply)
    assert links == {}
    assert "laptop sent invalid link measurements: link probe results are not JSON" in caplog.text


# Valid JSON of the wrong shape. Each decoder must raise its own error, never a KeyError, TypeError or OverflowError.
WRONG_SHAPES = [
    pytest.param(
        lambda: LinkProbeRequest.from_config({**PROBE_REQUEST.to_config(), "peers": '"phone"'}),
        ConfigError, "link probe request's peers='phone' is invalid", id="link-probe-peers-string",
    ),
    pytest.param(
        lambda: LinkProbeRequest.from_config({**PROBE_REQUEST.to_config(), "addresses": "[1]"}),
        ConfigError, "link probe request's addresses=[1] is invalid", id="link-probe-addresses-numbers",
    ),
    pytest.param(lambda: Plan.from_json("[1]"), PlanError, "plan [1] is invalid", id="planner-plan-list"),
    pytest.param(lambda: Plan.from_json('{"stages": []}'), PlanError, "plan is missing key 'idle_devices'", id="planner-plan-keys"),
    pytest.param(
        lambda: HouseholdPlan.from_json('{"stages": 3}'), PlanError, "household plan {'stages': 3} is invalid",
        id="household-plan-stages",
    ),
    pytest.param(
        lambda: HouseholdPlan.from_json('{"stages": [{}]}'), PlanError, "household plan is invalid: StageAssignment",
        id="household-plan-stage-keys",
    ),
    pytest.param(
        lambda: read_round_privacy({PRIVACY: "[1]"}), PrivacyError, "round privacy settings [1] are invalid",
        id="round-privacy-list",
    ),
    pytest.param(
        lambda: read_round_privacy({PRIVACY: '{"config": {}, "steps": "4"}'}), PrivacyError,
        "round privacy settings {'config': {}, 'steps': '4'} are invalid", id="round-privacy-steps",
    ),
    pytest.param(
        lambda: read_round_privacy({PRIVACY: json.dumps({**_round_privacy().to_dict(), "config": {
            **_round_privacy().config.to_dict(), "noise_multiplier": 10**400}})}),
        PrivacyError, "invalid privacy settings", id="round-privacy-huge-integer",
    ),
    pytest.param(lambda: _load_budget("[1]"), PrivacyError, "privacy budget [1] is invalid", id="budget-list"),
    pytest.param(
        lambda: _load_budget('{"target_epsilon": 1, "target_delta": 1e-5, "history": [[1, 2]]}'),
        PrivacyError, "invalid privacy budget", id="budget-short-entry",
    ),
    pytest.param(
        lambda: _load_budget('{"target_epsilon": 1, "target_delta": 1e-5, "history": [[1, 0.1, 1e400]]}'),
        PrivacyError, "invalid privacy budget", id="budget-infinite-steps",
    ),
]  # fmt: skip


@pytest.mark.parametrize("decode, error, message", WRONG_SHAPES)
def test_decoder_rejects_wrong_shape(decode, error, message):
    with pytest.raises(error) as caught:
        decode()
    assert message in str(caught.value)
    assert len(str(caught.value)) < 2000


def test_device_app_optimizer_list_replies_error(tmp_path, task_identity):
    app = device_app(model_fn=_model, example_inputs=lambda: (torch.zeros(1, 4),), load_data=_data)
    reply = app(_train_message(optimizer="[1, 2]"), _context(tmp_path))
    assert reply.has_error()
    assert "ConfigError: optimizer=[1, 2] is invalid" in reply.error.reason
