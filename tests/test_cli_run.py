"""``homesplit run``'s console filter, its run folder and its message when no household trained."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from homesplit import cli_run
from homesplit.household_plan import DeviceInfo
from homesplit.strategies.planning import plan_one

APP = Path(__file__).resolve().parents[1] / "examples" / "household-digits"


@pytest.fixture
def digits_model(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from household_digits.task import build_model

    with torch.device("meta"):
        return build_model(), (torch.zeros(1, 1, 8, 8),)


def test_echo_shows_plan_line(digits_model, caplog, capsys):
    model, inputs = digits_model
    devices = [
        DeviceInfo("household-b", "laptop", "127.0.0.1:1", 1, holds_data=True, num_examples=400),
        DeviceInfo("household-b", "phone", "127.0.0.1:2", 2),
        DeviceInfo("household-b", "raspberry-pi", "127.0.0.1:3", 3),
    ]
    with caplog.at_level(logging.INFO, logger="homesplit.strategies.planning"):
        plan_one(devices, model=model, example_inputs=inputs, min_devices=2, max_stages=2, num_microbatches=4, schedule="1f1b")
    [record] = [r for r in caplog.records if r.name == "homesplit.strategies.planning"]
    # The ServerApp's log format (household_digits.server_app).
    line = f"12:00:00 INFO {record.name}: {record.getMessage()}"

    cli_run._echo(line)
    cli_run._echo("12:00:00 INFO homesplit.strategies.discovery: Discovering 3 nodes")

    shown = capsys.readouterr().out.splitlines()
    assert shown == [line]
    assert "2 stages ['laptop', 'phone']" in line
    assert "idle ['raspberry-pi']" in line
    assert "cuts [" in line


def _run_folder(tmp_path: Path) -> Path:
    root = tmp_path / "homesplit-run-x"
    (root / cli_run.HOUSEHOLDS_FOLDER / "household-a").mkdir(parents=True)
    (root / cli_run.HOUSEHOLDS_FOLDER / "household-a" / "ca.key").write_text("key")
    logs = root / "homesplit-federation-y" / "logs"
    logs.mkdir(parents=True)
    (logs / "superlink.log").write_text("log")
    return root


def test_clean_run_deletes_run_folder(tmp_path):
    root = _run_folder(tmp_path)
    cli_run._clean_up_run_folder(root, keep_files=False, clean=True)
    assert not root.exists()


def test_failed_run_keeps_logs_only(tmp_path):
    root = _run_folder(tmp_path)
    cli_run._clean_up_run_folder(root, keep_files=False, clean=False)
    assert not (root / cli_run.HOUSEHOLDS_FOLDER).exists()
    assert (root / "homesplit-federation-y" / "logs" / "superlink.log").is_file()


def test_failed_run_without_logs_leaves_nothing(tmp_path):
    root = tmp_path / "homesplit-run-x"
    (root / cli_run.HOUSEHOLDS_FOLDER).mkdir(parents=True)
    cli_run._clean_up_run_folder(root, keep_files=False, clean=False)
    assert not root.exists()


@pytest.mark.parametrize("clean", [True, False])
def test_keep_files_keeps_both_folders(tmp_path, clean):
    root = _run_folder(tmp_path)
    cli_run._clean_up_run_folder(root, keep_files=True, clean=clean)
    assert (root / cli_run.HOUSEHOLDS_FOLDER / "household-a" / "ca.key").is_file()
    assert (root / "homesplit-federation-y" / "logs" / "superlink.log").is_file()


def test_kept_files_line_names_both_folders(tmp_path, capsys):
    root = _run_folder(tmp_path)
    cli_run._print_kept_files({"files_kept": str(root)})
    out = capsys.readouterr().out
    assert f"files kept in {root}:" in out
    assert "households/ (each household's CA and device bundles)" in out
    assert "homesplit-federation-y/ (Flower logs in logs/" in out
    assert "private keys" in out

    cli_run._print_kept_files({"files_kept": None})
    assert capsys.readouterr().out == ""


def test_no_training_message_lists_reasons():
    failures = {
        "household-a": ["device laptop in rounds 1-4: optimizer.name='Adamm' is not a torch.optim optimizer"],
        "household-b": ["device phone in round 1: no reply", "device laptop in rounds 2-4: lost"],
    }
    lines = cli_run._no_training_message(4, failures).splitlines()
    assert lines[0].startswith("no household trained in any of the 4 rounds")
    assert lines[2] == "  household-a: device laptop in rounds 1-4: optimizer.name='Adamm' is not a torch.optim optimizer"
    assert lines[3:] == ["  household-b: device phone in round 1: no reply", "  household-b: device laptop in rounds 2-4: lost"]


def test_no_training_message_without_failures():
    message = cli_run._no_training_message(1, {})
    assert message.startswith("no household trained in the only round,")
    assert "none could be planned" in message
