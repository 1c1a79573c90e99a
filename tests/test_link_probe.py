"""The discovery link probe between two devices, over real mutual TLS on loopback."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from homesplit.clients.link_probe import echo_owner, measure_peers
from homesplit.clients.node import DeviceConfig
from homesplit.errors import LinkError
from homesplit.link_probes import LinkProbeRequest, ProbeResult, decode_results, encode_results
from homesplit.pki import Household
from homesplit.planner.profiles import LinkProfile


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles of the laptop and phone of one household, and of a laptop of another household."""
    root = tmp_path_factory.mktemp("households")
    home = Household.create(root / "smith", "smith")
    out = {}
    for device in ("laptop", "phone"):
        _, out[device] = home.enroll(device, out=root / device)
    foreign = Household.create(root / "jones", "jones")
    _, out["foreign-laptop"] = foreign.enroll("laptop", out=root / "foreign-laptop")
    return out


def _device(name: str, bundle: Path, rendezvous: Path, *, household: str = "smith", listen: str = "127.0.0.1:0") -> DeviceConfig:
    return DeviceConfig(
        household=household,
        device=name,
        listen=listen,
        advertise=listen,
        bundle=str(bundle),
        insecure_links=False,
        holds_data=name == "laptop",
        partition_id=None,
        num_partitions=None,
        rendezvous_dir=rendezvous,
        threads=1,
        simulated=False,
        node_config={},
        run_config={},
    )


def _request(budget: float, session: int, address: str = "127.0.0.1:0") -> LinkProbeRequest:
    return LinkProbeRequest(session=session, owner="laptop", peers=("phone",), addresses=(address,), budget_seconds=budget)


def _free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class _Echo:
    """Run `echo_owner` for the phone in a thread and keep its result or error."""

    def __init__(self, device: DeviceConfig, request: LinkProbeRequest) -> None:
        self.result: dict[str, object] = {}
        self.thread = threading.Thread(target=self._run, args=(device, request), daemon=True)
        self.thread.start()

    def _run(self, device: DeviceConfig, request: LinkProbeRequest) -> None:
        try:
            self.result["echoed"] = echo_owner(device, request)
        except Exception as exc:  # noqa: BLE001 - reported to the test thread
            self.result["error"] = exc

    def join(self, seconds: float) -> dict[str, object]:
        self.thread.join(seconds)
        assert not self.thread.is_alive(), "echo_owner did not return before its deadline"
        return self.result


def test_probe_over_tls_measures_link(bundles, tmp_path):
    request = _request(budget=20.0, session=1)
    echo = _Echo(_device("phone", bundles["phone"], tmp_path), request)

    results = measure_peers(_device("laptop", bundles["laptop"], tmp_path), request)
    echoed = echo.join(25.0)

    link = results["phone"].link
    assert results["phone"].error is None
    assert echoed.get("echoed", 0) > 0, echoed
    # Loopback TLS moves at least 10 MB/s with a latency under 50 ms on any machine that runs the tests.
    assert link.bandwidth_bytes_per_second > 10e6
    assert 0 <= link.latency_seconds < 0.05
    assert decode_results(encode_results(results))["phone"].link == link


def test_probe_rejects_foreign_household(bundles, tmp_path):
    # A fixed port, because the port files of port-0 listeners are per household.
    address = _free_address()
    request = _request(budget=3.0, session=2, address=address)
    echo = _Echo(_device("phone", bundles["phone"], tmp_path, listen=address), request)

    stranger = _device("laptop", bundles["foreign-laptop"], tmp_path, household="jones")
    results = measure_peers(stranger, request)
    echoed = echo.join(10.0)

    assert results["phone"].link is None
    assert "PeerRejectedError" in results["phone"].error
    assert isinstance(echoed.get("error"), LinkError), echoed


def test_invalid_measurement_decodes_as_error():
    text = encode_results({"phone": ProbeResult(link=LinkProfile(1e6, 0.001)), "tv": ProbeResult(error="timed out")})
    broken = text.replace('"tv": {"error": "timed out"}', '"tv": {"bandwidth_bytes_per_second": -1, "latency_seconds": 0}')

    results = decode_results(broken)

    assert results["phone"].link == LinkProfile(1e6, 0.001)
    assert results["tv"].link is None
    assert "invalid measurement" in results["tv"].error


@pytest.mark.parametrize(
    "entry",
    ['{"bandwidth_bytes_per_second": Infinity, "latency_seconds": 0}', '{"bandwidth_bytes_per_second": 1e6, "latency_seconds": Infinity}'],
    ids=["infinite_bandwidth", "infinite_latency"],
)
def test_non_finite_measurement_decodes_as_error(entry: str):
    results = decode_results('{"tv": ' + entry + "}")

    assert results["tv"].link is None
    assert "finite" in results["tv"].error
