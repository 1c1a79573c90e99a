"""Tests of LocalFederation with real Flower processes on loopback."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import parse_config_args

from homesplit.errors import ConfigError, FederationError
from homesplit.federation import LocalFederation, SimulationSpec, SuperNodeSpec
from homesplit.flower_config import format_config
from process_watch import ProcessWatcher

ECHO_APP = Path(__file__).parent / "apps" / "echo_app"

DEVICES = [
    SuperNodeSpec(
        "household-a/laptop",
        {"household": "household-a", "device": "laptop", "listen": "127.0.0.1:9100", "bundle": "/tmp/a b/laptop"},
    ),
    SuperNodeSpec(
        "household-a/phone",
        {"household": "household-a", "device": "phone", "listen": "127.0.0.1:9101", "holds-data": True},
    ),
    SuperNodeSpec(
        "household-b/raspberry-pi",
        {"household": "household-b", "device": "raspberry-pi", "listen": "[::1]:9102", "examples": 120},
    ),
]


@pytest.fixture(autouse=True)
def flower_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep Flower's files in a temporary FLWR_HOME and its telemetry off."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


def run_config(tmp_path: Path, **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {
        "result-path": str(tmp_path / "result.json"),
        "expected-nodes": len(DEVICES),
        "train-rounds": 2,
        "reply-timeout": 120.0,
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "values",
    [
        {"household": "household-a", "device": "phone"},
        {"listen": "127.0.0.1:9100", "bundle": "/path/with space/bundle.tar"},
        {"windows": "C:\\Users\\dev", "quote": "it's", "empty": ""},
        {"flag": True, "off": False, "count": 3, "negative": -7, "ratio": 0.25, "tiny": 1e-12},
        {"unicode": "küche-gerät", "dotted.key": "x", "tab": "a\tb"},
    ],
)
def test_format_config_round_trips_through_flower(values: dict[str, object]) -> None:
    assert parse_config_args([format_config(values)]) == values


@pytest.mark.parametrize(
    "values",
    [
        {"bad key": "x"},
        {"": "x"},
        {"key=": "x"},
        {"both": "it's \"quoted\""},
        {"list": [1, 2]},
        {"none": None},
    ],
)
def test_format_config_rejects_invalid_values(values: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        format_config(values)


def test_federation_rejects_inconsistent_arguments() -> None:
    with pytest.raises(ConfigError, match="either"):
        LocalFederation([])
    with pytest.raises(ConfigError, match="either"):
        LocalFederation(DEVICES, simulation=SimulationSpec(num_supernodes=2))
    with pytest.raises(ConfigError, match="unique"):
        LocalFederation([DEVICES[0], DEVICES[0]])
    with pytest.raises(ConfigError, match="both"):
        LocalFederation([SuperNodeSpec("x", {"path": "'\""})])


@pytest.mark.slow
def test_federation_runs_echo_app_over_tls(tmp_path: Path) -> None:
    with ProcessWatcher() as watcher, LocalFederation(DEVICES, root_dir=tmp_path) as federation:
        workdir = federation.workdir
        node_ids = dict(federation.node_ids)
        result = federation.run(
            ECHO_APP,
            run_config=run_config(tmp_path, **{"train-sleep": 1.0}),
            timeout=300,
        )

    assert result.status == "finished:completed"
    assert result.lost_supernodes == ()
    assert federation.startup_seconds is not None

    echoed = json.loads((tmp_path / "result.json").read_text())
    assert sorted(echoed["node_ids"]) == sorted(node_ids.values())
    for spec in DEVICES:
        reply = echoed["query"]["replies"][str(node_ids[spec.name])]
        reported = {key: value for key, value in reply["node_config"].items() if key != "pid"}
        assert reported == dict(spec.node_config), spec.name
    for round_number, round_result in enumerate(echoed["train"], start=1):
        assert len(round_result["replies"]) == len(DEVICES)
        for reply in round_result["replies"].values():
            assert reply["arrays"] == {"weight": [[1.0, 1.0], [1.0, 1.0]]}
            # Context.state carries the count from one ClientApp process to the next.
            assert reply["metrics"]["train-calls"] == round_number

    expected_programs = {"flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp"}
    assert expected_programs <= watcher.programs
    assert watcher.still_running() == []
    assert not workdir.exists()


@pytest.mark.slow
def test_federation_superlink_serves_tls_only(tmp_path: Path) -> None:
    with LocalFederation(DEVICES[:1], root_dir=tmp_path) as federation:
        host, port = federation.superlink_address.rsplit(":", 1)
        ca_path = federation.certificates.ca_certfile
        config = tomllib.loads((federation.flwr_home / "config.toml").read_text())
        connection = config["superlink"][config["superlink"]["default"]]

        context = ssl.create_default_context(cafile=str(ca_path))
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
                tls_version = tls.version()

        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            plaintext_reply = raw.recv(1024)

    assert connection["root-certificates"] == str(ca_path)
    assert "insecure" not in connection
    assert isinstance(peer.public_key(), ec.EllipticCurvePublicKey)
    assert peer.public_key().curve.name == "secp256r1"
    assert tls_version == "TLSv1.3"
    assert not plaintext_reply.startswith(b"HTTP/1.1 200")


@pytest.mark.slow
def test_federation_insecure_only_when_asked(tmp_path: Path) -> None:
    with LocalFederation(DEVICES[:1], root_dir=tmp_path, insecure=True) as federation:
        config = tomllib.loads((federation.flwr_home / "config.toml").read_text())
        connection = config["superlink"][config["superlink"]["default"]]
        assert federation.certificates is None
        result = federation.run(
            ECHO_APP,
            run_config=run_config(tmp_path, **{"expected-nodes": 1, "train-rounds": 1}),
            timeout=300,
        )

    assert connection.get("insecure") is True
    assert "root-certificates" not in connection
    assert result.status == "finished:completed"
    echoed = json.loads((tmp_path / "result.json").read_text())
    assert len(echoed["query"]["replies"]) == 1


@pytest.mark.slow
def test_federation_stops_all_on_supernode_kill(tmp_path: Path) -> None:
    victim = "household-a/phone"
    with ProcessWatcher() as watcher, LocalFederation(DEVICES, root_dir=tmp_path) as federation:

        def on_log(line: str) -> None:
            if "echo_app: query" in line:
                os.kill(federation.supernode_pid(victim), signal.SIGKILL)

        with pytest.raises(FederationError) as raised:
            federation.run(
                ECHO_APP,
                run_config=run_config(tmp_path, **{"train-sleep": 5.0}),
                timeout=300,
                on_log=on_log,
            )
        still_running_inside = watcher.still_running()

    assert raised.value.component == f"flower-supernode for {victim}"
    assert "was killed by SIGKILL during the run" in str(raised.value)
    assert "SuperNode ID" in str(raised.value), "the error carries the SuperNode's last log lines"
    # The federation stopped itself before raising, not only on leaving `with`.
    assert still_running_inside == []
    assert watcher.still_running() == []


@pytest.mark.slow
def test_federation_continues_after_supernode_kill(tmp_path: Path) -> None:
    victim = "household-a/phone"
    with LocalFederation(DEVICES, root_dir=tmp_path, stop_on_supernode_exit=False) as federation:
        victim_node = federation.node_ids[victim]

        def on_log(line: str) -> None:
            if "echo_app: query" in line:
                os.kill(federation.supernode_pid(victim), signal.SIGKILL)

        result = federation.run(
            ECHO_APP,
            run_config=run_config(tmp_path, **{"train-rounds": 1, "reply-timeout": 150.0}),
            timeout=300,
            on_log=on_log,
        )

    assert result.status == "finished:completed"
    assert result.lost_supernodes == (victim,)
    replies = json.loads((tmp_path / "result.json").read_text())["train"][0]["replies"]
    # Flower reports the dead node as unavailable (code 5) once it missed its
    # heartbeats, and sends that error from the SuperLink, node id 1.
    assert replies[str(victim_node)]["error"]["code"] == 5
    assert replies[str(victim_node)]["src_node_id"] == 1
    assert all("arrays" in reply for node, reply in replies.items() if node != str(victim_node))


@pytest.mark.slow
def test_federation_stops_all_on_keyboard_interrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="homesplit")
    with ProcessWatcher() as watcher, LocalFederation(DEVICES[:2], root_dir=tmp_path) as federation:

        def on_log(line: str) -> None:
            if "Successfully started run" in line:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            federation.run(ECHO_APP, run_config=run_config(tmp_path), timeout=300, on_log=on_log)

    assert {"flower-superlink", "flower-supernode", "flwr"} <= watcher.programs
    assert watcher.still_running() == []
    assert (federation.log_dir / "superlink.log").is_file()
    assert (federation.workdir / "certs" / "server.pem").is_file()
    assert not (federation.workdir / "certs" / "server.key").exists()
    stopped = [r for r in caplog.records if "local federation stopped" in r.getMessage()]
    assert [r.levelno for r in stopped] == [logging.WARNING]
    assert f"after an interrupt; logs kept in {federation.log_dir}" in stopped[0].getMessage()


@pytest.mark.slow
def test_federation_startup_timeout_names_component(tmp_path: Path) -> None:
    federation = LocalFederation(DEVICES[:1], root_dir=tmp_path, startup_timeout=0.3)
    with pytest.raises(FederationError, match="timed out waiting for") as raised:
        federation.start()
    assert raised.value.component.startswith(("flower-superlink", "flower-supernode"))
    assert federation.live_pids() == []
