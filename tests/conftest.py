"""Shared test settings: no Flower telemetry, and Flower state in a temporary folder."""

from __future__ import annotations

import os

import pytest

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


@pytest.fixture(autouse=True)
def _flower_home(tmp_path, monkeypatch):
    """Give every test its own FLWR_HOME so that no test writes to ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
