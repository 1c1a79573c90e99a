"""The distribution builds as a wheel whose three import packages work without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_and_imports_all_packages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("flwr_homesplit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("homesplit/__init__.py", "homesplit/strategies/__init__.py", "homesplit/clients/__init__.py"):
        assert module in names, f"{module} missing from {wheel.name}"
    assert any(n.endswith("entry_points.txt") for n in names)

    # Unpack the wheel and import from it alone; -I ignores the editable
    # install's path hooks and the user's site folder.
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import homesplit, homesplit.strategies, homesplit.clients, homesplit.cli; "
        "print(homesplit.__file__); print(homesplit.strategies.__file__); print(homesplit.clients.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(unpacked)], check=True, capture_output=True, text=True, timeout=120, env=env
    )
    for line in result.stdout.splitlines():
        assert line.startswith(str(unpacked)), f"imported from {line}, not from the wheel"


def test_console_script_prints_version():
    result = subprocess.run(["homesplit", "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.startswith("homesplit ")


def test_console_script_prints_help():
    result = subprocess.run(["homesplit", "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "usage: homesplit" in result.stdout


def test_core_never_imports_flower():
    code = "import sys, homesplit.local, homesplit.stage, homesplit.partition, homesplit.cli; print('flwr' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_help_imports_no_torch():
    # --help must stay fast on a Raspberry Pi, where importing torch takes seconds.
    code = "import sys, homesplit.cli; homesplit.cli.build_parser(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_every_subcommand_registers():
    from homesplit.cli import build_parser

    help_text = build_parser().format_help()
    for name in ("run", "sweep", "household", "plan"):
        assert name in help_text
