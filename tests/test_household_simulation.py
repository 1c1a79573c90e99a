"""HomesplitStrategy under Flower's Ray simulation engine, checked against the unsplit model.

One household of two devices trains one round in simulation. The global
model that comes back must equal the unsplit model trained directly in this
process on the same mini-batches from the same initial weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from homesplit.federation import LocalFederation, SimulationSpec
from homesplit.minibatches import minibatches, round_seed
from homesplit.pki import Household
from homesplit.tensorfile import load_tensors

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"
SEED = 3
RUN_CONFIG = {
    "num-server-rounds": 1,
    "seed": SEED,
    "local-epochs": 1,
    "batch-size": 32,
    "optimizer": json.dumps({"name": "SGD", "lr": 0.05, "momentum": 0.9}),
    "num-microbatches": 4,
    "schedule": "1f1b",
    "household-layout": "laptop+phone",
    "min-available-nodes": 2,
}


def _reference_state() -> dict[str, torch.Tensor]:
    """Train the unsplit model exactly as the household should have, without Flower."""
    sys.path.insert(0, str(APP))
    try:
        from household_digits import task
    finally:
        sys.path.remove(str(APP))
    torch.manual_seed(SEED)
    model = task.build_model()
    data = task.household_partition(0, 1, {"seed": SEED, "partitioner": "iid"})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for inputs, targets in minibatches(*data.train, batch_size=32, epochs=1, seed=round_seed(SEED, 1)):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: value.detach() for name, value in model.state_dict().items()}


@pytest.mark.slow
def test_simulation_one_round_equals_unsplit_training(tmp_path):
    bundles = tmp_path / "bundles"
    ca = Household.create(tmp_path / "ca", "household-1")
    for device in ("laptop", "phone"):
        ca.enroll(device, out=bundles / "household-1" / device)
    model_path = tmp_path / "model.tensors"
    result_path = tmp_path / "results.json"
    run_config = dict(RUN_CONFIG, **{"bundle-root": str(bundles), "model-path": str(model_path), "result-path": str(result_path)})

    spec = SimulationSpec(num_supernodes=2, clientapp_cpus=1, ray_cpus=2)
    with LocalFederation(simulation=spec, root_dir=tmp_path) as federation:
        federation.run(APP, run_config=run_config, timeout=300)

    results = json.loads(result_path.read_text())
    assert results["rounds"][0]["households_trained"] == ["household-1"]
    federated = load_tensors(model_path)
    reference = _reference_state()
    assert sorted(federated) == sorted(reference)
    for name, value in reference.items():
        torch.testing.assert_close(federated[name], value, rtol=1e-5, atol=1e-6, msg=f"parameter {name} differs")


@pytest.mark.slow
def test_simulation_serial_clientapps_fail_fast(tmp_path):
    # Two CPUs per ClientApp out of two: the engine runs one device at a time,
    # so the household's two stages can never meet.
    result_path = tmp_path / "results.json"
    run_config = dict(
        RUN_CONFIG,
        **{"insecure-links": True, "connect-timeout": 10.0, "result-path": str(result_path)},
    )
    spec = SimulationSpec(num_supernodes=2, clientapp_cpus=2, ray_cpus=2)
    with LocalFederation(simulation=spec, root_dir=tmp_path) as federation:
        outcome = federation.run(APP, run_config=run_config, timeout=240)

    assert outcome.seconds < 120
    record = json.loads(result_path.read_text())["rounds"][0]
    assert record["households_trained"] == []
    failures = record["households_failed"]["household-1"]
    assert set(failures) == {"laptop", "phone"}
    for error in failures.values():
        assert "client-resources-num-cpus" in error
        assert "init-args-num-cpus" in error
