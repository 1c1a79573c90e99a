"""DP budgets and the sweep in real local Flower federations of household-digits.

Each run starts a real flower-superlink and one flower-supernode per device
on loopback through `homesplit run`'s code path (plaintext, to keep the runs
short; TLS is tested in test_household_federation.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import psutil
import pytest
from opacus.accountants import RDPAccountant

from homesplit.cli import main as homesplit_main
from homesplit.cli_run import run_experiment
from homesplit.cli_sweep import finished_run, sweep_experiment
from homesplit.errors import ConfigError
from homesplit.experiment import load_experiment
from homesplit.privacy.accounting import compute_epsilon

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"
SIGMA = 1.0
BATCH = 128
# The rounds of a results.json in which the household trained.
TRAINED_ROUNDS = [{"round": 1, "households_trained": ["household-a"], "households_failed": {}}]


def _write_experiment(path: Path, *, rounds: int, privacy: str) -> Path:
    path.write_text(
        f"""
app: {APP}
rounds: {rounds}
seed: 0
model: household_digits.task:build_model
example-shape: [1, 1, 8, 8]
households:
  - id: household-a
    devices: [{{name: laptop, holds-data: true}}, {{name: phone}}]
training: {{local-epochs: 1, batch-size: {BATCH}, optimizer: {{name: SGD, lr: 0.05, momentum: 0.9}}}}
timeouts: {{startup: 120, round: 200, connect: 60, run: 400}}
privacy: {privacy}
""",
        encoding="utf-8",
    )
    return path


def _own_flower_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(Path(arg).name.startswith(("flower-", "flwr")) for arg in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _round_epsilon(rounds: int, *, sample_rate: float, steps: int) -> float:
    return compute_epsilon([(SIGMA, sample_rate, steps * rounds)], delta=1e-5)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """Run 4 rounds with a budget that two rounds fit into and three do not; return results.json."""
    root = tmp_path_factory.mktemp("budget")
    # The single household trains on 90% of the 1,437 training images: 1,294 examples.
    sample_rate, steps = BATCH / 1294, 11
    target = (_round_epsilon(2, sample_rate=sample_rate, steps=steps) + _round_epsilon(3, sample_rate=sample_rate, steps=steps)) / 2
    privacy = f"{{mode: sample, target-epsilon: {target}, noise-multiplier: {SIGMA}, max-grad-norm: 1.0}}"
    experiment = load_experiment(_write_experiment(root / "experiment.yaml", rounds=4, privacy=privacy))
    run_experiment(experiment, out=root / "out", insecure=True)
    results = json.loads((root / "out" / "results.json").read_text())
    return {"results": results, "target": target}


@pytest.mark.slow
def test_budget_stops_after_two_rounds(budget_run):
    results = budget_run["results"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["summary"]["stopped_after_round"] == 2
    for record in results["rounds"]:
        assert record["households_trained"] == ["household-a"]
        assert record["privacy"]["household-a"]["epsilon"] <= budget_run["target"]
    assert _own_flower_processes() == []


@pytest.mark.slow
def test_results_epsilon_matches_opacus(budget_run):
    records = [r["privacy"]["household-a"] for r in budget_run["results"]["rounds"]]
    accountant = RDPAccountant()
    for record in records:
        assert record["noise_multiplier"] == SIGMA
        assert record["delta"] == 1e-5
        assert record["steps"] == 11
        assert record["sample_rate"] == pytest.approx(BATCH / 1294)
        for _ in range(record["steps"]):
            accountant.step(noise_multiplier=record["noise_multiplier"], sample_rate=record["sample_rate"])
        assert record["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)


@pytest.mark.slow
def test_sweep_writes_table_and_plot(tmp_path, capsys):
    experiment = _write_experiment(tmp_path / "experiment.yaml", rounds=1, privacy="{max-grad-norm: 1.0, target-epsilon: 1}")
    code = homesplit_main(
        ["sweep", str(experiment), "--epsilon", "2,inf", "--seeds", "1", "--out", str(tmp_path / "sweep"), "--insecure"]
    )
    assert code == 0

    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))
    assert [float(r["target_epsilon"]) for r in rows] == [2.0, float("inf")]
    assert 0 < float(rows[0]["epsilon_spent"]) <= 2.0
    assert float(rows[0]["noise_multiplier"]) > 0
    assert float(rows[1]["noise_multiplier"]) == 0.0
    assert all(r["rounds_trained"] == "1" for r in rows)
    markdown = (tmp_path / "sweep" / "sweep.md").read_text()
    assert markdown.startswith("| target epsilon | runs | accuracy mean")
    assert "| inf | 1 |" in markdown
    assert (tmp_path / "sweep" / "accuracy_vs_epsilon.png").stat().st_size > 1000
    assert _own_flower_processes() == []

    # A resumed sweep with the same settings reuses both finished runs.
    results = tmp_path / "sweep" / "epsilon-2" / "seed-0" / "results.json"
    written = results.stat().st_mtime_ns
    capsys.readouterr()
    code = homesplit_main(
        ["sweep", str(experiment), "--epsilon", "2,inf", "--out", str(tmp_path / "sweep"), "--insecure", "--resume"]
    )
    assert code == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 2
    assert results.stat().st_mtime_ns == written
    assert len(list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))) == 2


def test_resume_refuses_run_with_other_settings(tmp_path):
    experiment = load_experiment(_write_experiment(tmp_path / "experiment.yaml", rounds=1, privacy="{max-grad-norm: 1.0, target-epsilon: 1}"))
    variant = sweep_experiment(experiment, target_epsilon=2.0, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = dict(variant.config, rounds=5)
    (run_dir / "results.json").write_text(json.dumps({"config": other, "summary": {"run_status": "finished:completed"}}))

    with pytest.raises(ConfigError, match="other settings"):
        finished_run(run_dir, variant)


def test_resume_reruns_unfinished_run(tmp_path):
    experiment = load_experiment(_write_experiment(tmp_path / "experiment.yaml", rounds=1, privacy="{max-grad-norm: 1.0, target-epsilon: 1}"))
    variant = sweep_experiment(experiment, target_epsilon=2.0, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = json.loads(json.dumps(variant.config))
    (run_dir / "results.json").write_text(json.dumps({"config": config, "summary": {"run_status": "finished:failed"}}))

    assert finished_run(run_dir, variant) is None
    finished = {"config": config, "summary": {"run_status": "finished:completed"}, "rounds": TRAINED_ROUNDS}
    (run_dir / "results.json").write_text(json.dumps(finished))
    assert finished_run(run_dir, variant)["summary"]["run_status"] == "finished:completed"


def test_resume_reruns_run_without_training(tmp_path):
    experiment = load_experiment(_write_experiment(tmp_path / "experiment.yaml", rounds=1, privacy="{max-grad-norm: 1.0, target-epsilon: 1}"))
    variant = sweep_experiment(experiment, target_epsilon=2.0, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = json.loads(json.dumps(variant.config))
    untrained = [{"round": 1, "households_trained": [], "households_failed": {"household-a": {"laptop": "error"}}}]
    results = {"config": config, "summary": {"run_status": "finished:completed"}, "rounds": untrained}
    (run_dir / "results.json").write_text(json.dumps(results))

    assert finished_run(run_dir, variant) is None


@pytest.mark.slow
def test_central_noise_run_records_epsilon(tmp_path):
    privacy = f"{{mode: household, noise: central, target-epsilon: 100, noise-multiplier: {SIGMA}, max-grad-norm: 1.0}}"
    experiment = load_experiment(_write_experiment(tmp_path / "experiment.yaml", rounds=2, privacy=privacy))

    run_experiment(experiment, out=tmp_path / "out", insecure=True)

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for number, record in enumerate(results["rounds"], start=1):
        assert record["households_trained"] == ["household-a"]
        spent = record["privacy"]["household-a"]
        assert spent["noise_multiplier"] == SIGMA
        assert spent["sample_rate"] == 1.0
        assert spent["steps"] == 1
        # One household-level step per round at q = 1 (sample-rate's default).
        assert spent["epsilon"] == pytest.approx(compute_epsilon([(SIGMA, 1.0, number)], delta=1e-5), rel=1e-9)
    # Noise of std sigma * C = 1 per weight can leave the model predicting one
    # class, whose accuracy equals the untrained model's, so compare losses.
    assert results["rounds"][0]["eval_loss"] != results["rounds"][1]["eval_loss"]
    assert _own_flower_processes() == []


def test_resume_fills_keys_added_since(tmp_path):
    experiment = load_experiment(_write_experiment(tmp_path / "experiment.yaml", rounds=1, privacy="{max-grad-norm: 1.0, target-epsilon: 1}"))
    variant = sweep_experiment(experiment, target_epsilon=2.0, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    older = json.loads(json.dumps(variant.config))
    del older["planner"]
    results = {"config": older, "summary": {"run_status": "finished:completed"}, "rounds": TRAINED_ROUNDS}
    (run_dir / "results.json").write_text(json.dumps(results))

    assert finished_run(run_dir, variant) is not None
