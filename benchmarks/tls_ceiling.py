"""Throughput of Python's ssl module against plaintext on this machine, without framing.

Prints one JSON document. `benchmarks/link_throughput.py` measures homesplit's
links, and this script measures the upper bound that Python's ssl module sets
for them. Two processes on
127.0.0.1 stream chunks of 1 MiB or 16 MiB into one reused buffer, with no
frame headers, no tensors and no threads, over three transports:

- ``plain``: TCP;
- ``tls_stream``: TLS 1.3 through `homesplit.tls_stream.TlsStream`, the memory
  BIOs that the links use;
- ``ssl_socket``: TLS 1.3 through `ssl.SSLSocket`, which lets OpenSSL read and
  write the socket itself.

TLS runs with the same household certificates and contexts as the links.
Within each repeat the transports take turns, so that other load on the
machine affects all three alike. The result gives the median MB/s
(10**6 bytes per second), the CPU time per MiB of the sending and the receiving
process, and the ratio of each TLS transport to plaintext.

Two figures need no socket: encrypting and decrypting TLS records between two
`ssl.SSLObject` ends in one process, and AES-256-GCM alone from ``openssl
speed`` (skipped when the ``openssl`` command is missing).

Run::

    python benchmarks/tls_ceiling.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_support import enroll_devices, machine_facts, read_line, start, stop

from homesplit.bundle import DeviceBundle
from homesplit.tls import client_context, server_context
from homesplit.tls_stream import TlsStream

TRANSPORTS = ("plain", "tls_stream", "ssl_socket")
CHUNKS = {"1MiB": 1 << 20, "16MiB": 16 << 20}
HOUSEHOLD = "ceiling"
# Every socket call of either process times out after this long.
SOCKET_SECONDS = 60.0
PEER_START_SECONDS = 30.0
# The measuring side sends the byte count of the next stream as one unsigned
# 64-bit integer, and a count of 0 stops the server. The server replies with
# the CPU seconds it spent receiving, as one float64.
COUNT = struct.Struct("!Q")
SECONDS = struct.Struct("!d")
MiB = 1 << 20


def _wrap(sock: socket.socket, transport: str, bundle: Path, *, server_side: bool):
    """Return `sock` as the stream object of `transport`, after the handshake if any."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(SOCKET_SECONDS)
    if transport == "plain":
        return sock
    device = DeviceBundle.from_dir(bundle)
    context = server_context(device) if server_side else client_context(device)
    if transport == "tls_stream":
        return TlsStream.handshake(sock, context, server_side=server_side)
    # The household contexts check the peer's certificate, not a host name.
    return context.wrap_socket(sock, server_side=server_side)


def _recv_exactly(stream, view: memoryview) -> None:
    received = 0
    while received < len(view):
        count = stream.recv_into(view[received:])
        if count == 0:
            raise ConnectionError(f"peer closed the connection after {received} of {len(view)} bytes")
        received += count


def serve(transport: str, bundle: Path, chunk: int) -> None:
    """Receiving role: accept one connection and receive streams into one reused buffer."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(PEER_START_SECONDS)
    print(listener.getsockname()[1], flush=True)
    raw, _ = listener.accept()
    listener.close()
    stream = _wrap(raw, transport, bundle, server_side=True)
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    count_bytes = bytearray(COUNT.size)
    try:
        while True:
            _recv_exactly(stream, memoryview(count_bytes))
            (total,) = COUNT.unpack(count_bytes)
            if total == 0:
                return
            started = time.process_time()
            received = 0
            while received < total:
                count = stream.recv_into(view[: min(chunk, total - received)])
                if count == 0:
                    raise ConnectionError(f"peer closed the connection after {received} of {total} bytes")
                received += count
            stream.sendall(SECONDS.pack(time.process_time() - started))
    finally:
        stream.close()


class _Peer:
    """A receiving process and the measuring side's connection to it."""

    def __init__(self, transport: str, bundles: Path, chunk: int) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--role", "serve", "--transport", transport,
                   "--bundle", str(bundles / "receiver"), "--chunk", str(chunk)]  # fmt: skip
        self.process = start(command)
        try:
            port = int(read_line(self.process, PEER_START_SECONDS, name=f"{transport} receiver"))
            raw = socket.create_connection(("127.0.0.1", port), timeout=PEER_START_SECONDS)
            self.stream = _wrap(raw, transport, bundles / "sender", server_side=False)
        except BaseException:
            self.stop()
            raise
        self.cipher = self.stream.cipher()[0] if transport != "plain" else None

    def stream_once(self, data: memoryview, total: int) -> tuple[float, float, float]:
        """Send `total` bytes in chunks of `data`; return MB/s and the CPU µs per MiB of sender and receiver."""
        self.stream.sendall(COUNT.pack(total))
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(total // len(data)):
            self.stream.sendall(data)
        reply = bytearray(SECONDS.size)
        _recv_exactly(self.stream, memoryview(reply))
        elapsed = time.perf_counter() - started
        sender_cpu = time.process_time() - cpu_started
        (receiver_cpu,) = SECONDS.unpack(reply)
        mib = total / MiB
        return total / elapsed / 1e6, sender_cpu / mib * 1e6, receiver_cpu / mib * 1e6

    def stop(self) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            try:
                stream.sendall(COUNT.pack(0))
            except OSError:
                pass
            stream.close()
        stop(self.process)


def measure_streams(bundles: Path, stream_bytes: int, repeats: int) -> tuple[dict, str | None]:
    """Stream every chunk size over every transport; return the figures and the TLS cipher suite."""
    results: dict[str, dict] = {}
    cipher = None
    for label, chunk in CHUNKS.items():
        data = memoryview(os.urandom(chunk))
        total = max(8, stream_bytes // chunk) * chunk
        peers = {}
        try:
            for transport in TRANSPORTS:
                peers[transport] = _Peer(transport, bundles, chunk)
                cipher = cipher or peers[transport].cipher
            runs: dict[str, list[tuple[float, float, float]]] = {transport: [] for transport in TRANSPORTS}
            for peer in peers.values():
                # Warm-up: page in the buffers and let TCP open its window.
                peer.stream_once(data, max(len(data), total // 8))
            for _ in range(repeats):
                for transport, peer in peers.items():
                    runs[transport].append(peer.stream_once(data, total))
        finally:
            for peer in peers.values():
                peer.stop()
        figures = {
            transport: {
                "mb_per_s": round(statistics.median(run[0] for run in runs[transport]), 1),
                "mb_per_s_runs": [round(run[0], 1) for run in runs[transport]],
                "sender_cpu_us_per_mib": round(statistics.median(run[1] for run in runs[transport])),
                "receiver_cpu_us_per_mib": round(statistics.median(run[2] for run in runs[transport])),
            }
            for transport in TRANSPORTS
        }
        for transport in TRANSPORTS[1:]:
            figures[f"{transport}_over_plain"] = round(figures[transport]["mb_per_s"] / figures["plain"]["mb_per_s"], 3)
        figures["mib_per_run"] = total // MiB
        results[label] = figures
    return results, cipher


def measure_in_memory(bundles: Path, total_mib: int) -> dict:
    """Time TLS record encryption and decryption between two `ssl.SSLObject` ends, with no socket."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context(DeviceBundle.from_dir(bundles / "sender")).wrap_bio(client_in, client_out, server_side=False)
    server = server_context(DeviceBundle.from_dir(bundles / "receiver")).wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    if client.version() is None or server.version() is None:
        raise RuntimeError("the in-memory TLS handshake did not finish after 10 rounds of messages; check the household certificates")
    plaintext = memoryview(os.urandom(MiB))
    buffer = memoryview(bytearray(MiB))
    encrypt = decrypt = 0.0
    for _ in range(total_mib):
        started = time.process_time()
        # The links encrypt in 256 KiB writes (homesplit.tls_stream).
        ciphertext = []
        for offset in range(0, MiB, 256 << 10):
            client.write(plaintext[offset : offset + (256 << 10)])
            ciphertext.append(client_out.read())
        middle = time.process_time()
        for piece in ciphertext:
            server_in.write(piece)
            received = 0
            while True:
                try:
                    received += server.read(MiB - received, buffer[received:])
                except ssl.SSLWantReadError:
                    break
        encrypt += middle - started
        decrypt += time.process_time() - middle
    return {
        "cipher": client.cipher()[0],
        "encrypt_cpu_us_per_mib": round(encrypt / total_mib * 1e6),
        "decrypt_cpu_us_per_mib": round(decrypt / total_mib * 1e6),
        "mib": total_mib,
    }


def openssl_speed() -> dict:
    """Return AES-256-GCM throughput from ``openssl speed`` on 16 KiB blocks, the size of a full TLS record."""
    command = ["openssl", "speed", "-seconds", "2", "-bytes", "16384", "-evp", "aes-256-gcm"]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"skipped": f"`{' '.join(command)}` failed: {exc}"}
    # The last line reads "AES-256-GCM   4149870.59k": thousands of bytes per second.
    last = completed.stdout.strip().splitlines()[-1].split()
    if len(last) < 2 or not last[-1].endswith("k"):
        return {"skipped": f"unexpected `openssl speed` output: {completed.stdout.strip()[-200:]!r}"}
    rate = float(last[-1][:-1]) * 1e3
    return {"command": " ".join(command), "mb_per_s": round(rate / 1e6, 1), "cpu_us_per_mib": round(MiB / rate * 1e6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["main", "serve"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--transport", choices=TRANSPORTS, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stream-bytes", type=int, default=256 << 20, help="bytes per stream measurement (default: 256 MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="stream measurements per chunk size and transport; the median is reported (default: 5)")
    parser.add_argument("--quick", action="store_true", help="stream 32 MiB per measurement with 2 repeats, for a smoke test")
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.transport, Path(args.bundle), args.chunk)
        return
    stream_bytes, repeats = (32 << 20, 2) if args.quick else (args.stream_bytes, args.repeats)
    if stream_bytes < MiB or repeats < 1:
        parser.error(f"--stream-bytes {stream_bytes} and --repeats {repeats} must be at least 1 MiB and 1")

    with tempfile.TemporaryDirectory(prefix="homesplit-ceiling-") as scratch:
        bundles = enroll_devices(Path(scratch), HOUSEHOLD, ("sender", "receiver"))
        report = machine_facts(openssl=ssl.OPENSSL_VERSION)
        report["stream"], report["machine"]["tls_cipher"] = measure_streams(bundles, stream_bytes, repeats)
        report["in_memory_tls"] = measure_in_memory(bundles, 16 if args.quick else 64)
    report["openssl_speed_aes_256_gcm"] = openssl_speed()
    report["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
