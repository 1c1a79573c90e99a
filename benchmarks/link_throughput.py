"""Throughput and round-trip latency of plaintext TCP links against mutual-TLS links.

Prints one JSON document. For each tensor size (4 KiB, 64 KiB, 1 MiB, 16 MiB)
and each transport, it reports MB/s (10**6 bytes per second) of a one-way
stream of frames, and the CPU time per MiB that the sending and the receiving
process spent on it. It also reports the median and 90th percentile round trip of
one frame that the peer echoes, and the ratio TLS / plaintext of MB/s. Both
ends are separate processes, as two devices would be.

Two setups are measured:

- ``loopback``: both processes on 127.0.0.1.
- ``shaped``: each process in its own network namespace, joined by a veth pair
  shaped with ``tc ... tbf rate 1gbit``, as a wired home network is. This needs
  root. Where the namespaces cannot be created, this part is skipped and the
  result gives the reason. The namespaces are deleted afterwards in every case.

Run::

    python benchmarks/link_throughput.py [--quick] [--no-shaped]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_support import enroll_devices, machine_facts, read_line, start, stop

from homesplit.errors import PeerClosedError
from homesplit.tls import TlsTransport
from homesplit.transport import PeerIdentity, TcpTransport, open_listener
from homesplit.wire import Frame, FrameKind

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
HOUSEHOLD = "bench"
UPSTREAM = PeerIdentity("bench-up", 0, HOUSEHOLD)
DOWNSTREAM = PeerIdentity("bench-down", 1, HOUSEHOLD)
NAMESPACES = (f"hsbench-a-{os.getpid()}", f"hsbench-b-{os.getpid()}")
VETH = (f"hsba{os.getpid() % 100000}", f"hsbb{os.getpid() % 100000}")
SHAPED_ADDRESSES = ("10.231.0.1", "10.231.0.2")
PEER_START_SECONDS = 30.0
FRAME_SECONDS = 60.0


def _transport(kind: str, bundle: str | None) -> TcpTransport:
    return TlsTransport(bundle) if kind == "tls" else TcpTransport()


def serve(kind: str, bundle: str | None, listen: str) -> None:
    """Downstream role: accept one link, ack streams and echo round-trip frames."""
    listener = open_listener(listen)
    host, port = listener.getsockname()[:2]
    print(json.dumps({"listen": f"{host}:{port}"}), flush=True)
    link = _transport(kind, bundle).accept(listener, local=DOWNSTREAM, expect=UPSTREAM)
    listener.close()
    try:
        while True:
            frame = link.recv(timeout=FRAME_SECONDS)
            if frame.kind is FrameKind.GRADIENT:
                link.send(frame)
            elif frame.kind is FrameKind.METRIC or frame.microbatch + 1 == frame.step:
                # A METRIC request, or the last frame of a stream (`step`
                # carries the stream length): answer with this process's CPU
                # time so far, which the measuring side turns into CPU per MiB.
                link.send(Frame(FrameKind.METRIC, torch.tensor([_cpu_seconds()], dtype=torch.float64)))
    except PeerClosedError:
        # The measuring side ends the benchmark by closing the link.
        pass
    finally:
        link.close()


def _cpu_seconds() -> float:
    # os.times() ticks in 10 ms steps, too coarse for one stream.
    return time.process_time()


def _stream(link, tensor: torch.Tensor, count: int) -> tuple[float, float, float]:
    """Stream `count` frames; return MB/s and the CPU µs per MiB of the sender and of the receiver."""
    link.send(Frame(FrameKind.METRIC, torch.zeros(1, dtype=torch.float64)))
    receiver_before = link.recv(timeout=FRAME_SECONDS).tensor.item()
    sender_before = _cpu_seconds()
    start = time.perf_counter()
    for index in range(count):
        link.send(Frame(FrameKind.ACTIVATION, tensor, step=count, microbatch=index))
    receiver_after = link.recv(timeout=FRAME_SECONDS).tensor.item()
    elapsed = time.perf_counter() - start
    sender_cpu = _cpu_seconds() - sender_before
    total = count * tensor.numel() * tensor.element_size()
    mib = total / (1 << 20)
    return total / elapsed / 1e6, sender_cpu / mib * 1e6, (receiver_after - receiver_before) / mib * 1e6


def _round_trips_ms(link, tensor: torch.Tensor, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        link.send(Frame(FrameKind.GRADIENT, tensor))
        link.recv(timeout=FRAME_SECONDS)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(addresses: dict[str, str], bundle: str, stream_bytes: int, repeats: int) -> dict:
    """Upstream role: dial one server per transport and measure every size.

    The transports take turns within each size, so that load from other
    processes on the machine affects both alike and the ratio stays fair.
    """
    links = {kind: _transport(kind, bundle).dial(address, local=UPSTREAM, expect=DOWNSTREAM) for kind, address in addresses.items()}
    results: dict[str, dict] = {kind: {} for kind in links}
    try:
        for label, size in SIZES.items():
            tensor = torch.randint(0, 255, (size,), dtype=torch.uint8)
            count = max(8, min(4000, stream_bytes // size))
            pings = max(10, min(1000, (64 << 20) // size))
            rates: dict[str, list[float]] = {kind: [] for kind in links}
            send_cpu: dict[str, list[float]] = {kind: [] for kind in links}
            recv_cpu: dict[str, list[float]] = {kind: [] for kind in links}
            trips: dict[str, list[float]] = {kind: [] for kind in links}
            for kind, link in links.items():
                _stream(link, tensor, max(2, count // 8))
                _round_trips_ms(link, tensor, max(2, pings // 10))
            for _ in range(repeats):
                for kind, link in links.items():
                    rate, sender, receiver = _stream(link, tensor, count)
                    rates[kind].append(rate)
                    send_cpu[kind].append(sender)
                    recv_cpu[kind].append(receiver)
                    trips[kind].extend(_round_trips_ms(link, tensor, max(1, pings // repeats)))
            for kind in links:
                ordered = sorted(trips[kind])
                results[kind][label] = {
                    "mb_per_s": round(statistics.median(rates[kind]), 1),
                    # The best run is the one least disturbed by other processes.
                    "mb_per_s_best": round(max(rates[kind]), 1),
                    "mb_per_s_runs": [round(rate, 1) for rate in rates[kind]],
                    # CPU time moves far less with the machine's load than MB/s.
                    "sender_cpu_us_per_mib": round(statistics.median(send_cpu[kind])),
                    "receiver_cpu_us_per_mib": round(statistics.median(recv_cpu[kind])),
                    "rtt_median_ms": round(statistics.median(ordered), 4),
                    "rtt_p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
                    "frames_per_run": count,
                    "round_trips": len(ordered),
                }
    finally:
        for link in links.values():
            link.close()
    return results


def run_pair(bundles: Path, *, server_prefix: list[str], client_prefix: list[str], listen: str, connect_host: str, stream_bytes: int, repeats: int) -> dict:
    """Start one server per transport and one client, and return the figures with ratios."""
    script = [sys.executable, os.path.abspath(__file__)]
    servers = {}
    try:
        addresses = {}
        for kind in ("plain", "tls"):
            servers[kind] = start(server_prefix + script + ["--role", "serve", "--transport", kind, "--bundle", str(bundles / "bench-down"), "--listen", listen])
            port = json.loads(read_line(servers[kind], PEER_START_SECONDS, name="benchmark server"))["listen"].rsplit(":", 1)[1]
            addresses[kind] = f"{connect_host}:{port}"
        client = start(
            client_prefix + script + ["--role", "measure", "--sizes", ",".join(SIZES), "--bundle", str(bundles / "bench-up"), "--connect", json.dumps(addresses),
                                      "--stream-bytes", str(stream_bytes), "--repeats", str(repeats)]
        )
        try:
            out, err = client.communicate(timeout=900)
        finally:
            stop(client)
        if client.returncode != 0:
            raise RuntimeError(f"benchmark client failed with exit code {client.returncode}: {err[-2000:]}")
    finally:
        for server in servers.values():
            stop(server)
    result = json.loads(out)
    result["tls_over_plain_mb_per_s"] = {
        label: round(result["tls"][label]["mb_per_s"] / result["plain"][label]["mb_per_s"], 3) for label in SIZES
    }
    result["tls_over_plain_best_mb_per_s"] = {
        label: round(result["tls"][label]["mb_per_s_best"] / result["plain"][label]["mb_per_s_best"], 3) for label in SIZES
    }
    return result


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _create_namespaces() -> None:
    ns_a, ns_b = NAMESPACES
    veth_a, veth_b = VETH
    _ip("netns", "add", ns_a)
    _ip("netns", "add", ns_b)
    _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
    for namespace, veth, address in ((ns_a, veth_a, SHAPED_ADDRESSES[0]), (ns_b, veth_b, SHAPED_ADDRESSES[1])):
        _ip("link", "set", veth, "netns", namespace)
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", veth)
        _ip("-n", namespace, "link", "set", veth, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        # A 1 Gbit/s token bucket. The burst lets a few full-size segments
        # through back to back, as a switch port would. Latency bounds the queue.
        subprocess.run(
            ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", veth, "root", "tbf",
             "rate", "1gbit", "burst", "128kb", "latency", "5ms"],
            check=True, capture_output=True, text=True, timeout=30,
        )


def _delete_namespaces() -> None:
    for namespace in NAMESPACES:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
    # Deleting a namespace deletes the veth ends inside it. This catches a pair
    # left in the root namespace when creation failed halfway.
    subprocess.run(["ip", "link", "del", VETH[0]], capture_output=True, timeout=30)


def shaped(bundles: Path, stream_bytes: int, repeats: int) -> dict:
    """Measure both transports across two network namespaces on a 1 Gbit/s veth link."""
    try:
        _create_namespaces()
    except (OSError, subprocess.SubprocessError) as exc:
        _delete_namespaces()
        detail = getattr(exc, "stderr", "") or str(exc)
        return {"skipped": f"network namespaces could not be created (needs root and iproute2): {detail.strip()}"}
    try:
        result = run_pair(
            bundles,
            server_prefix=["ip", "netns", "exec", NAMESPACES[1]],
            client_prefix=["ip", "netns", "exec", NAMESPACES[0]],
            listen=f"{SHAPED_ADDRESSES[1]}:0", connect_host=SHAPED_ADDRESSES[1], stream_bytes=stream_bytes, repeats=repeats,
        )
        result["link"] = "veth pair between two network namespaces, tc tbf rate 1gbit burst 128kb latency 5ms"
        return result
    finally:
        _delete_namespaces()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["main", "serve", "measure"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--transport", choices=["plain", "tls"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    parser.add_argument("--stream-bytes", type=int, default=256 << 20, help="bytes per stream measurement (default: 256 MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="stream measurements per size and transport; the median is reported (default: 5)")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated tensor sizes to measure (default: {','.join(SIZES)})")
    parser.add_argument("--quick", action="store_true", help="stream 32 MiB per measurement, for a smoke test")
    parser.add_argument("--no-shaped", action="store_true", help="skip the network-namespace part")
    args = parser.parse_args()
    torch.set_num_threads(1)
    unknown = set(args.sizes.split(",")) - set(SIZES)
    if unknown:
        parser.error(f"--sizes has unknown sizes {sorted(unknown)}; choose from {','.join(SIZES)}")
    for label in [label for label in SIZES if label not in args.sizes.split(",")]:
        del SIZES[label]

    if args.role == "serve":
        serve(args.transport, args.bundle, args.listen)
        return
    if args.role == "measure":
        print(json.dumps(measure(json.loads(args.connect), args.bundle, args.stream_bytes, args.repeats)))
        return

    stream_bytes = 32 << 20 if args.quick else args.stream_bytes
    with tempfile.TemporaryDirectory(prefix="homesplit-bench-") as scratch:
        bundles = enroll_devices(Path(scratch), HOUSEHOLD, ("bench-up", "bench-down"))
        report = {
            **machine_facts(),
            "loopback": run_pair(bundles, server_prefix=[], client_prefix=[], listen="127.0.0.1:0",
                                 connect_host="127.0.0.1", stream_bytes=stream_bytes, repeats=args.repeats),
        }
        if args.no_shaped:
            report["shaped"] = {"skipped": "--no-shaped was given"}
        else:
            # 1 Gbit/s moves about 119 MiB/s, so a smaller volume keeps the run short.
            report["shaped"] = shaped(bundles, min(stream_bytes, 64 << 20), args.repeats)
    report["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
