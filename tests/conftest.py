"""Shared test settings: no Flower telemetry, and Flower state in a temporary folder."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="homesplit-flwr-home-"))


@pytest.fixture(autouse=True)
def _flower_home(tmp_path, monkeypatch):
    """Give every test its own FLWR_HOME so no test writes to ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
