"""Privacy settings of experiments, and the data owner's budget in the real device ClientApp.

The ClientApp is Flower's own object, called in this process with real
Messages and a real Context, on plaintext loopback links.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from homesplit.clients import DeviceData, device_app
from homesplit.errors import ConfigError
from homesplit.experiment import household_privacy, load_experiment
from homesplit.household_plan import HouseholdPlan, StageAssignment
from homesplit.privacy.accounting import compute_epsilon
from homesplit.privacy.settings import check_settings, decode_run_config, encode_run_config, resolve_round
from homesplit.records import ARRAYS, CONFIG, METRICS, PLAN, PRIVACY, PRIVACY_STATUS

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"

EXPERIMENT = f"""
app: {APP}
rounds: 2
model: household_digits.task:build_model
example-shape: [1, 1, 8, 8]
households:
  - id: household-a
    devices: [{{name: laptop, holds-data: true}}, {{name: phone}}]
  - id: household-b
    devices: [{{name: laptop, holds-data: true}}, {{name: phone}}]
"""

DATASET_SIZE = 40
SETTINGS = {"target-epsilon": 10.0, "noise-multiplier": 1.0, "expected-batch-size": 10}


def _load(tmp_path: Path, extra: str):
    path = tmp_path / "experiment.yaml"
    path.write_text(EXPERIMENT + extra, encoding="utf-8")
    return load_experiment(path)


def test_experiment_privacy_per_household(tmp_path):
    text = EXPERIMENT.replace("  - id: household-b\n", "  - id: household-b\n    privacy: null\n") + "privacy: {target-epsilon: 8}\n"
    (tmp_path / "experiment.yaml").write_text(text, encoding="utf-8")
    experiment = load_experiment(tmp_path / "experiment.yaml")
    chosen = household_privacy(experiment.config)
    assert chosen["household-a"]["target-epsilon"] == 8.0
    assert chosen["household-a"]["noise-multiplier"] == "auto"
    assert chosen["household-b"] is None
    assert decode_run_config(encode_run_config(chosen)) == {"household-a": chosen["household-a"]}


@pytest.mark.parametrize(
    ("privacy", "expected"),
    [
        ("{target-epsilon: 8, sigma: 1}", "unknown key 'privacy.sigma'"),
        ("{target-epsilon: -1}", "privacy.target-epsilon=-1 is invalid; allowed: a number > 0, or inf"),
        ("{mode: user, target-epsilon: 8}", "privacy.mode='user' is invalid; allowed: sample, household"),
        ("{target-epsilon: 8, target-delta: 2}", "privacy.target-delta=2 is invalid; allowed: a number in (0, 1)"),
        ("{target-epsilon: 8, noise-multiplier: lots}", "privacy.noise-multiplier='lots' is invalid"),
        ("{target-epsilon: 8, max-grad-norm: 0}", "privacy.max-grad-norm=0 is invalid; allowed: a finite number > 0"),
        ("{target-epsilon: 8, accountant: gdp}", "privacy.accountant='gdp' is invalid; allowed: rdp, prv"),
        ("{target-epsilon: 8, expected-batch-size: -3}", "privacy.expected-batch-size=-3 is invalid"),
        ("{target-epsilon: 8, sample-rate: 0.5}", "privacy.sample-rate=0.5 is invalid in mode sample"),
        ("{target-epsilon: 8, noise: central}", "privacy.noise='central' is invalid in mode sample"),
        ("{target-epsilon: 8, max-grad-norm: [0.5, 0.5]}", "privacy.max-grad-norm=[0.5, 0.5] is invalid; allowed: a finite number > 0, or a list of them with clipping: per_segment"),
        ("{target-epsilon: 8, clipping: per_segment, max-grad-norm: [0.5, 0]}", "privacy.max-grad-norm=[0.5, 0] is invalid"),
        ("{target-epsilon: 8, clipping: per_segment, max-grad-norm: []}", "privacy.max-grad-norm=[] is invalid"),
        ("{mode: household, target-epsilon: 8, clipping: per_segment}", "privacy.clipping='per_segment' is invalid in mode household"),
        ("{mode: household, target-epsilon: 8, sample-rate: 0.5}", "privacy.sample-rate=0.5 is not supported yet"),
        ("[8]", "privacy=[8] is invalid; allowed: a mapping"),
    ],
)
def test_experiment_privacy_rejected(tmp_path, privacy, expected):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"privacy: {privacy}\n")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("privacy", "expected"),
    [
        ("{target-epsilon: 8, clipping: per_segment, max-grad-norm: 0.8}", 0.8),
        ("{target-epsilon: 8, clipping: per_segment, max-grad-norm: [0.3, 1.2]}", [0.3, 1.2]),
        ("{mode: household, noise: central, target-epsilon: 8}", 1.0),
    ],
)
def test_experiment_privacy_accepted(tmp_path, privacy, expected):
    experiment = _load(tmp_path, f"privacy: {privacy}\n")
    chosen = household_privacy(experiment.config)
    assert chosen["household-a"]["max-grad-norm"] == expected
    assert decode_run_config(encode_run_config(chosen)) == chosen


def test_experiment_mixed_central_noise_rejected(tmp_path):
    text = EXPERIMENT.replace("  - id: household-b\n", "  - id: household-b\n    privacy: null\n")
    (tmp_path / "experiment.yaml").write_text(text + "privacy: {mode: household, noise: central, target-epsilon: 8}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(tmp_path / "experiment.yaml")
    assert "households ['household-a'] have noise='central' but ['household-b'] do not" in str(info.value)


def test_run_config_privacy_rejected():
    with pytest.raises(ConfigError, match=r"run config privacy\['household-a'\].mode='x' is invalid"):
        decode_run_config(json.dumps({"household-a": {"mode": "x", "target-epsilon": 1}}))


def test_resolve_round_calibrates_sigma():
    settings = check_settings({"target-epsilon": 4.0}, where="privacy")
    resolved = resolve_round(settings, dataset_size=400, batch_size=20, local_epochs=2, num_rounds=3)
    assert resolved.config.sample_rate == pytest.approx(0.05)
    assert resolved.steps == 40
    spent = compute_epsilon([(resolved.config.noise_multiplier, 0.05, 3 * 40)], delta=1e-5)
    assert 3.9 <= spent <= 4.0


# -- the data owner's budget in the ClientApp ---------------------------------


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Give Flower's Message constructor the run and node ids a Flower process would have."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(device) -> DeviceData:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(DATASET_SIZE, 4, generator=generator)
    return DeviceData(train=(inputs, torch.randint(0, 3, (DATASET_SIZE,), generator=generator)))


def _app():
    return device_app(model_fn=_model, example_inputs=lambda: (torch.zeros(1, 4),), load_data=_data)


def _plan(devices: list[str]) -> HouseholdPlan:
    stages = [StageAssignment(stage=k, device=d, node_id=k + 1, address="127.0.0.1:0") for k, d in enumerate(devices)]
    cuts = ["2"] if len(devices) == 2 else []
    return HouseholdPlan(
        household="home", cuts=cuts, stages=stages, num_microbatches=2, schedule="gpipe", num_examples=DATASET_SIZE
    )


def _context(device: str, rendezvous: Path, settings: dict, *, holds_data: bool) -> Context:
    node_config = {
        "household": "home", "device": device, "listen": "127.0.0.1:0", "insecure-links": True,
        "holds-data": holds_data, "rendezvous-dir": str(rendezvous),
    }  # fmt: skip
    run_config = {"privacy": json.dumps({"home": settings}), "num-server-rounds": 3}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def _train_message(plan: HouseholdPlan, stage: int, server_round: int, privacy: dict) -> Message:
    # With two stages the cut is at layer "2": stage 0 contains layer 0, stage 1 contains layer 2.
    prefix = {(1, 0): "", (2, 0): "0.", (2, 1): "2."}[(plan.num_stages, stage)]
    state = {n: v for n, v in _model().state_dict().items() if n.startswith(prefix)}
    config = ConfigRecord(
        {
            PLAN: plan.to_json(), "stage": stage, "server-round": server_round, "batch-size": 10,
            "local-epochs": 1, "connect-timeout": 20.0, PRIVACY: json.dumps(privacy),
        }
    )  # fmt: skip
    return Message(
        RecordDict({ARRAYS: ArrayRecord(state), CONFIG: config}),
        dst_node_id=stage + 1,
        message_type="train",
    )


def _round_privacy(settings: dict, *, num_stages: int = 1) -> dict:
    checked = check_settings(settings, where="privacy")
    return resolve_round(
        checked, dataset_size=DATASET_SIZE, batch_size=10, local_epochs=1, num_rounds=3, num_stages=num_stages
    ).to_dict()


def _budget_history(context: Context) -> list:
    return json.loads(str(context.state.config_records["homesplit-privacy-budget"]["json"]))["history"]


def test_data_owner_declines_spent_budget(tmp_path):
    # Each round is 4 steps at q = 0.25; the target fits two rounds but not three.
    two_rounds = compute_epsilon([(1.0, 0.25, 8)], delta=1e-5)
    three_rounds = compute_epsilon([(1.0, 0.25, 12)], delta=1e-5)
    settings = {**SETTINGS, "target-epsilon": (two_rounds + three_rounds) / 2}
    app, plan = _app(), _plan(["laptop"])
    context = _context("laptop", tmp_path, settings, holds_data=True)
    privacy = _round_privacy(settings)

    for server_round in (1, 2):
        reply = app(_train_message(plan, 0, server_round, privacy), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        metrics = reply.content.metric_records[METRICS]
        assert metrics["privacy-steps"] == 4
        assert metrics["privacy-epsilon"] == pytest.approx(compute_epsilon([(1.0, 0.25, 4 * server_round)], delta=1e-5))
    assert _budget_history(context) == [[1.0, 0.25, 8]]

    reply = app(_train_message(plan, 0, 3, privacy), context)
    assert not reply.has_error()
    status = reply.content.config_records[PRIVACY_STATUS]
    assert status["status"] == "budget_exhausted"
    assert "round declined" in str(status["message"])
    assert ARRAYS not in reply.content.array_records
    assert _budget_history(context) == [[1.0, 0.25, 8]]


def test_data_owner_rejects_weaker_noise(tmp_path):
    app, plan = _app(), _plan(["laptop"])
    context = _context("laptop", tmp_path, SETTINGS, holds_data=True)
    weaker = _round_privacy({**SETTINGS, "noise-multiplier": 0.5})
    reply = app(_train_message(plan, 0, 1, weaker), context)
    assert reply.has_error()
    assert "differ from the data owner's own" in reply.error.reason
    assert "homesplit-privacy-budget" not in context.state.config_records


def test_declined_round_stops_other_stage(tmp_path):
    settings = {**SETTINGS, "target-epsilon": compute_epsilon([(1.0, 0.25, 4)], delta=1e-5) / 2}
    app, plan = _app(), _plan(["laptop", "phone"])
    privacy = _round_privacy(settings)
    owner = _context("laptop", tmp_path, settings, holds_data=True)
    phone = _context("phone", tmp_path, settings, holds_data=False)
    replies: dict[str, Message] = {}
    worker = threading.Thread(target=lambda: replies.setdefault("phone", app(_train_message(plan, 1, 1, privacy), phone)))
    worker.start()

    owner_reply = app(_train_message(plan, 0, 1, privacy), owner)
    worker.join(timeout=30)

    assert not worker.is_alive(), "the phone's stage still waits after the data owner declined"
    assert owner_reply.content.config_records[PRIVACY_STATUS]["status"] == "budget_exhausted"
    assert replies["phone"].has_error()
    assert "round declined" in replies["phone"].error.reason
    assert math.isfinite(owner_reply.content.metric_records[METRICS]["privacy-target-epsilon"])


def test_dp_example_experiment_is_valid():
    experiment = load_experiment(APP / "experiment-dp.yaml")
    chosen = household_privacy(experiment.config)
    assert sorted(chosen) == ["household-a", "household-b", "household-c"]
    assert all(settings["target-epsilon"] == 8.0 for settings in chosen.values())


def test_household_mode_counts_one_step(tmp_path):
    settings = {"mode": "household", "target-epsilon": 50.0, "noise-multiplier": 1.0, "sample-rate": 1.0}
    app, plan = _app(), _plan(["laptop"])
    context = _context("laptop", tmp_path, settings, holds_data=True)
    reply = app(_train_message(plan, 0, 1, _round_privacy(settings)), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content.metric_records[METRICS]
    assert metrics["privacy-steps"] == 1
    assert metrics["privacy-sample-rate"] == 1.0
    assert metrics["privacy-epsilon"] == pytest.approx(compute_epsilon([(1.0, 1.0, 1)], delta=1e-5))


def _train_two_stages(tmp_path: Path, settings: dict, privacy: dict) -> dict[str, Message]:
    """Run one train round of a two-stage household, the phone's stage in a thread; return both replies."""
    app, plan = _app(), _plan(["laptop", "phone"])
    owner = _context("laptop", tmp_path, settings, holds_data=True)
    phone = _context("phone", tmp_path, settings, holds_data=False)
    replies: dict[str, Message] = {}
    worker = threading.Thread(target=lambda: replies.setdefault("phone", app(_train_message(plan, 1, 1, privacy), phone)))
    worker.start()
    replies["laptop"] = app(_train_message(plan, 0, 1, privacy), owner)
    worker.join(timeout=60)
    assert not worker.is_alive(), "the phone's stage did not finish"
    return replies


def test_per_segment_bounds_reach_both_stages(tmp_path):
    settings = {**SETTINGS, "clipping": "per_segment", "max-grad-norm": 0.8}
    privacy = _round_privacy(settings, num_stages=2)
    assert privacy["config"]["max_grad_norm"] == pytest.approx([0.8 / math.sqrt(2)] * 2)

    replies = _train_two_stages(tmp_path, settings, privacy)

    for device, reply in replies.items():
        assert not reply.has_error(), f"{device}: {reply.error.reason if reply.has_error() else ''}"
    assert replies["laptop"].content.metric_records[METRICS]["privacy-steps"] == 4


def test_data_owner_rejects_other_stage_count(tmp_path):
    # Bounds resolved for three stages, sent to a two-stage household: each is C/sqrt(3), not C/sqrt(2).
    settings = {**SETTINGS, "clipping": "per_segment", "max-grad-norm": 0.8}
    privacy = _round_privacy(settings, num_stages=3)
    privacy["config"]["max_grad_norm"] = privacy["config"]["max_grad_norm"][:2]
    owner = _context("laptop", tmp_path, settings, holds_data=True)

    # The data owner rejects the message before it connects to the phone's stage.
    reply = _app()(_train_message(_plan(["laptop", "phone"]), 0, 1, privacy), owner)

    assert reply.has_error()
    assert "differ from the data owner's own" in reply.error.reason
