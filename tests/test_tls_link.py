"""Mutual TLS links on real loopback sockets: who is accepted and who is rejected."""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from homesplit.bundle import DeviceBundle
from homesplit.errors import ConfigError, LinkError, PeerRejectedError
from homesplit.link import LinkTimeouts, read_frame, write_frame
from homesplit.pki import Household
from homesplit.tls import TlsTransport, client_context
from homesplit.tls_stream import TlsStream
from homesplit.transport import PeerIdentity, TcpTransport, open_listener
from homesplit.wire import Frame, FrameKind, FrameLimits

HOUSEHOLD = "smith"
PHONE = PeerIdentity("phone", 0, HOUSEHOLD)
LAPTOP = PeerIdentity("laptop", 1, HOUSEHOLD)
TV = PeerIdentity("tv", 0, HOUSEHOLD)
TIMEOUTS = LinkTimeouts(connect=10.0, recv=5.0, peer_silence=5.0, heartbeat=1.0)
ATTEMPT_SECONDS = 5.0


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles of one household (good and bad ones) and of a foreign household."""
    root = tmp_path_factory.mktemp("households")
    home = Household.create(root / "smith", HOUSEHOLD)
    out = {}

    # Revoke first, so that every bundle issued afterwards carries the new CRL.
    home.enroll("phone", out=root / "phone-revoked")
    home.revoke("phone")
    out["revoked"] = root / "phone-revoked"
    _, out["expired"] = home.enroll("phone", days=1, out=root / "phone-expired", now=_days_ago(3))
    for device in ("phone", "laptop", "tv"):
        _, out[device] = home.enroll(device, out=root / device)

    foreign = Household.create(root / "jones", "jones")
    _, out["foreign"] = foreign.enroll("phone", out=root / "foreign-phone")
    _, out["foreign-household"] = foreign.enroll("laptop", out=root / "foreign-laptop")
    return out


def _days_ago(days: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)


class Listener:
    """The laptop (stage 1) accepting its upstream peer in a background thread."""

    def __init__(self, bundle: Path, *, local: PeerIdentity = LAPTOP, expect: PeerIdentity = PHONE) -> None:
        self.socket = open_listener("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.transport = TlsTransport(bundle, timeouts=TIMEOUTS)
        self.result: dict[str, object] = {}
        self.thread = threading.Thread(target=self._accept, args=(local, expect), daemon=True)
        self.thread.start()

    def _accept(self, local: PeerIdentity, expect: PeerIdentity) -> None:
        try:
            self.result["link"] = self.transport.accept(self.socket, local=local, expect=expect)
        except Exception as exc:  # noqa: BLE001 - reported to the test thread
            self.result["error"] = exc

    def join(self):
        self.thread.join(timeout=TIMEOUTS.connect + 5)
        assert not self.thread.is_alive(), "accept did not return before its deadline"
        self.socket.close()
        return self.result


def _dial_good_peer(listener: Listener, bundle: Path) -> None:
    """Dial as the right phone and check that one frame crosses the link both ways."""
    link = TlsTransport(bundle, timeouts=TIMEOUTS).dial(listener.address, local=PHONE, expect=LAPTOP)
    result = listener.join()
    assert "error" not in result, result.get("error")
    accepted = result["link"]
    try:
        tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        link.send(Frame(FrameKind.ACTIVATION, tensor))
        received = accepted.recv(timeout=5)
        assert torch.equal(received.tensor, tensor)
        accepted.send(Frame(FrameKind.GRADIENT, -tensor))
        assert torch.equal(link.recv(timeout=5).tensor, -tensor)
    finally:
        link.close()
        accepted.close()


def _raw_tls_attempt(address: str, context: ssl.SSLContext) -> None:
    """Handshake with `context`, send a HELLO and read the reply; raises when rejected."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=ATTEMPT_SECONDS) as raw:
        with context.wrap_socket(raw) as tls:
            write_frame(tls, Frame.text(FrameKind.HELLO, '{"device": "phone", "stage": 0, "household": "smith", "round": 0, "channel": "down", "session": "x"}'))
            reply, _ = read_frame(tls, FrameLimits(), peer=address)
            raise AssertionError(f"listener answered a rejected client with {reply.kind.name}")


def _attempt_plaintext(address: str, bundles: dict[str, Path]) -> None:
    TcpTransport(timeouts=replace(TIMEOUTS, connect=ATTEMPT_SECONDS)).dial(address, local=PHONE, expect=LAPTOP)


def _attempt_without_certificate(address: str, bundles: dict[str, Path]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cafile=str(bundles["phone"] / "ca.pem"))
    _raw_tls_attempt(address, context)


def _attempt_with_bundle(name: str, *, trust_home_ca: bool = True):
    def attempt(address: str, bundles: dict[str, Path]) -> None:
        bundle = DeviceBundle.from_dir(bundles[name])
        if trust_home_ca:
            # The client trusts the household CA, so that the listener, not the
            # client, is the side that rejects the handshake.
            home = DeviceBundle.from_dir(bundles["phone"])
            bundle = DeviceBundle(ca=home.ca, cert=bundle.cert, key=bundle.key, crl=home.crl)
        _raw_tls_attempt(address, client_context(bundle))

    return attempt


def _attempt_tls12_only(address: str, bundles: dict[str, Path]) -> None:
    context = client_context(DeviceBundle.from_dir(bundles["phone"]))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    _raw_tls_attempt(address, context)


def _attempt_wrong_device(address: str, bundles: dict[str, Path]) -> None:
    TlsTransport(bundles["tv"], timeouts=replace(TIMEOUTS, connect=ATTEMPT_SECONDS)).dial(address, local=TV, expect=LAPTOP)


REJECTED_CLIENTS = {
    "plaintext": (_attempt_plaintext, "did not start a TLS handshake"),
    "no_certificate": (_attempt_without_certificate, "sent no certificate"),
    "foreign_ca": (_attempt_with_bundle("foreign"), "unable to get local issuer certificate"),
    "expired": (_attempt_with_bundle("expired"), "certificate has expired"),
    "revoked": (_attempt_with_bundle("revoked"), "certificate revoked"),
    "wrong_device": (_attempt_wrong_device, "but the plan expects smith/phone (stage 0)"),
    "tls12_only": (_attempt_tls12_only, "does not offer TLS 1.3"),
}


@pytest.mark.parametrize("case", list(REJECTED_CLIENTS))
def test_listener_rejects_then_serves_peer(case: str, bundles: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    attempt, reason = REJECTED_CLIENTS[case]
    listener = Listener(bundles["laptop"])
    caplog.set_level(logging.WARNING, logger="homesplit")

    with pytest.raises((LinkError, ssl.SSLError, ConnectionError)):
        attempt(listener.address, bundles)
    _dial_good_peer(listener, bundles["phone"])

    rejections = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "homesplit.transport"]
    assert len(rejections) == 1, [r.getMessage() for r in rejections]
    message = rejections[0].getMessage()
    assert reason in message
    assert "Rejected connection from 127.0.0.1:" in message


def test_dial_rejects_wrong_listener_device(bundles: dict[str, Path]) -> None:
    listener = Listener(bundles["tv"], local=replace(TV, stage=1))
    with pytest.raises(PeerRejectedError, match="certificate for smith/tv, but the plan expects smith/laptop"):
        TlsTransport(bundles["phone"], timeouts=TIMEOUTS).dial(listener.address, local=PHONE, expect=LAPTOP)
    listener.socket.close()
    listener.thread.join(timeout=TIMEOUTS.connect + 5)


def test_dial_rejects_foreign_household_listener(bundles: dict[str, Path]) -> None:
    # A listener of another household fails the handshake: its certificate
    # does not chain to this household's CA.
    foreign = open_listener("127.0.0.1:0")
    address = f"127.0.0.1:{foreign.getsockname()[1]}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bundle = DeviceBundle.from_dir(bundles["foreign-household"])
    context.load_cert_chain(str(bundle.cert), str(bundle.key))

    def serve_once() -> None:
        foreign.settimeout(ATTEMPT_SECONDS)
        try:
            conn, _ = foreign.accept()
            with context.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(PeerRejectedError, match="certificate verification failed"):
            TlsTransport(bundles["phone"], timeouts=TIMEOUTS).dial(address, local=PHONE, expect=LAPTOP)
    finally:
        thread.join(timeout=ATTEMPT_SECONDS + 1)
        foreign.close()


def test_transport_rejects_plan_for_other_device(bundles: dict[str, Path]) -> None:
    transport = TlsTransport(bundles["phone"], timeouts=TIMEOUTS)
    with pytest.raises(ConfigError, match="bundle belongs to smith/phone"):
        transport.dial("127.0.0.1:9", local=TV, expect=LAPTOP)


def test_transport_rejects_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        TlsTransport(tmp_path)


def test_link_negotiates_tls13_with_certificates(bundles: dict[str, Path]) -> None:
    listener = Listener(bundles["laptop"])
    link = TlsTransport(bundles["phone"], timeouts=TIMEOUTS).dial(listener.address, local=PHONE, expect=LAPTOP)
    accepted = listener.join()["link"]
    try:
        for sock in (link._outbound, link._inbound, accepted._outbound, accepted._inbound):
            assert isinstance(sock, TlsStream)
            assert sock.version() == "TLSv1.3"
        assert link._outbound is not link._inbound
        assert accepted._outbound is not accepted._inbound
    finally:
        link.close()
        accepted.close()


@pytest.mark.slow
def test_pipeline_exact_over_tls(tmp_path: Path) -> None:
    from homesplit.job import PipelineJob
    from homesplit.local import run_local_pipelines, train_reference
    from homesplit.models import mlp
    from homesplit.partition import even_cuts

    household = Household.create(tmp_path / "household", "local")
    devices = ["stage0", "stage1", "stage2"]
    folders = [str(household.enroll(device, out=tmp_path / device)[1]) for device in devices]
    cuts = even_cuts(mlp(), 3, example_inputs=(torch.zeros(1, 32),))
    jobs = [
        PipelineJob(
            model="homesplit.models:mlp", example_shape=[1, 32], example_dtype="float32", cuts=cuts,
            data="homesplit.datasets:random_classification", data_kwargs={"steps": 3, "batch_size": 16, "seed": 1},
            schedule=schedule, num_microbatches=4, optimizer={"name": "SGD", "lr": 0.05, "momentum": 0.9},
            devices=devices, household="local",
        )
        for schedule in ("gpipe", "1f1b")
    ]  # fmt: skip
    initial = []
    for index, job in enumerate(jobs):
        torch.manual_seed(index)
        initial.append(job.build_model().state_dict())

    runs = run_local_pipelines(jobs, initial, workdir=tmp_path / "run", transport="tls", bundles=folders, deadline=120.0)

    for job, init, run in zip(jobs, initial, runs):
        reference, _ = train_reference(job, init)
        assert set(run.state) == set(reference), job.schedule
        for key, expected in reference.items():
            torch.testing.assert_close(run.state[key], expected, rtol=0, atol=1e-5, msg=lambda m: f"{key} {job.schedule}: {m}")
