"""Privacy accounting against Opacus and Abadi et al. 2016, and budget enforcement."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from opacus.accountants import RDPAccountant

from homesplit.errors import PrivacyError
from homesplit.privacy import PrivacyBudget, calibrate_noise_multiplier, compute_epsilon

# Abadi et al. 2016, "Deep Learning with Differential Privacy": q=0.01, sigma=4,
# 10,000 steps, delta=1e-5; their moments accountant reports epsilon 1.26.
ABADI = {"sigma": 4.0, "q": 0.01, "steps": 10_000, "delta": 1e-5, "epsilon": 1.26}


@pytest.fixture(autouse=True)
def _quiet_alpha_warning():
    # Opacus warns when the best RDP order is the largest it tries; the bound still holds.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def opacus_rdp_epsilon(history, delta) -> float:
    accountant = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_abadi_epsilon_equals_opacus_rdp():
    history = [(ABADI["sigma"], ABADI["q"], ABADI["steps"])]

    epsilon = compute_epsilon(history, delta=ABADI["delta"])

    assert epsilon == opacus_rdp_epsilon(history, ABADI["delta"])
    assert round(epsilon, 3) == 1.035
    assert epsilon <= ABADI["epsilon"]


def test_abadi_epsilon_prv_tighter_than_rdp():
    history = [(ABADI["sigma"], ABADI["q"], ABADI["steps"])]

    prv = compute_epsilon(history, delta=ABADI["delta"], accountant="prv")

    assert prv == pytest.approx(0.957, abs=0.005)
    assert prv < compute_epsilon(history, delta=ABADI["delta"])


def test_epsilon_of_mixed_history_equals_opacus():
    history = [(1.0, 0.02, 300), (1.5, 0.02, 200), (1.0, 0.05, 100)]

    assert compute_epsilon(history, delta=1e-5) == pytest.approx(opacus_rdp_epsilon(history, 1e-5), rel=1e-12)


@pytest.mark.parametrize(("history", "expected"), [([], 0.0), ([(0.0, 0.1, 5)], math.inf), ([(1.0, 0.1, 0)], 0.0)])
def test_epsilon_edge_cases(history, expected):
    assert compute_epsilon(history, delta=1e-5) == expected


def test_budget_stops_at_right_round():
    target, sigma, q, steps = 1.0, 1.0, 0.05, 20
    state = PrivacyBudget(target_epsilon=target, target_delta=1e-5).to_json()
    trained = 0
    for _ in range(100):
        budget = PrivacyBudget.from_dict(json.loads(state))
        decision = budget.check_round(noise_multiplier=sigma, sample_rate=q, steps=steps)
        if not decision.allowed:
            break
        budget.record_round(noise_multiplier=sigma, sample_rate=q, steps=steps)
        state = budget.to_json()
        trained += 1

    expected = 0
    while opacus_rdp_epsilon([(sigma, q, steps * (expected + 1))], 1e-5) <= target:
        expected += 1
    assert trained == expected
    assert decision.status == "budget_exhausted"
    assert decision.epsilon_after > target
    assert "declined" in decision.message
    spent = PrivacyBudget.from_dict(json.loads(state)).spent()
    assert spent <= target
    assert spent == pytest.approx(opacus_rdp_epsilon([(sigma, q, steps * trained)], 1e-5), rel=1e-12)


def test_budget_history_is_plain_merged_data():
    budget = PrivacyBudget(target_epsilon=8.0, target_delta=1e-5)
    budget.record_round(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    budget.record_round(noise_multiplier=1.0, sample_rate=0.01, steps=5)
    budget.record_round(noise_multiplier=2.0, sample_rate=0.01, steps=5)

    assert json.loads(budget.to_json())["history"] == [[1.0, 0.01, 15], [2.0, 0.01, 5]]


def test_budget_rejects_unknown_keys():
    with pytest.raises(PrivacyError, match="unknown privacy budget keys"):
        PrivacyBudget.from_dict({"target_epsilon": 1.0, "target_delta": 1e-5, "epsilon": 3})


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibrated_sigma_reaches_target(target):
    sigma = calibrate_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=0.01, steps=1000)

    epsilon = compute_epsilon([(sigma, 0.01, 1000)], delta=1e-5)
    assert target - 0.01 <= epsilon <= target


def test_calibration_infinite_budget_means_no_noise():
    assert calibrate_noise_multiplier(target_epsilon=math.inf, target_delta=1e-5, sample_rate=0.01, steps=10) == 0.0
