"""Devices as network namespaces joined by shaped veth links, for the planner benchmark.

`shaped_network` puts every device of a household in its own network
namespace and joins each pair of devices with a veth pair shaped by a token
bucket (``tc qdisc ... tbf``) at `RATE`, which emulates a home Wi-Fi
link. Wi-Fi is half duplex: both directions share the air. So where the
kernel has ``ifb`` and the ``clsact`` qdisc with ``u32`` and ``mirred``, both
directions of a pair go through one token bucket on an ifb device. The veth
end in the first device's namespace redirects its egress and its ingress to
the ifb device. Elsewhere each veth end gets its own token bucket, a
full-duplex link, on which an activation and a gradient that cross at the
same time take less time than the planner's half-duplex transfer time
predicts. `ShapedNetwork.duplex` records which shaping the pairs got.

`measure_pair_links` measures every pair with `homesplit.planner.linkprobe`,
one process in each namespace, over plaintext TCP as the benchmark's stages
use. The links add no delay beyond the kernel's own, because netem was not
available on the benchmark machine.

Run as a script, this file is the probe peer that `measure_pair_links`
starts inside a namespace::

    python benchmarks/shaped_links.py --role echo --listen 10.233.0.2:29000
    python benchmarks/shaped_links.py --role measure --connect 10.233.0.2:29000
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from bench_support import read_line, start, stop

from homesplit.planner import LinkProfile
from homesplit.planner.linkprobe import echo_link_probes, measure_link
from homesplit.transport import PeerIdentity, TcpTransport, open_listener

RATE = "200mbit"
# As in link_throughput.py: the burst lets a few full-size segments through
# back to back, and the latency bounds the queue.
BURST = "128kb"
QUEUE_LATENCY = "5ms"
SUBNET = "10.233"
PROBE_SECONDS = 120.0
PROBE_REPEATS = 25
PROBER = PeerIdentity("prober", 0, "bench")
ECHOER = PeerIdentity("echoer", 1, "bench")


@dataclass
class ShapedNetwork:
    """Namespaces of the devices and the addresses of the veth ends between them.

    Attributes
    ----------
    namespaces : dict of str to str
        Network namespace of each device.
    addresses : dict of (str, str) to str
        IPv4 address of the veth end in the first device's namespace that
        faces the second device.
    duplex : {"half", "full"}
        Whether both directions of a pair share one token bucket.
    """

    namespaces: dict[str, str]
    addresses: dict[tuple[str, str], str]
    duplex: str
    _ports: Iterator[int] = field(default_factory=lambda: itertools.count(30000))

    def prefix(self, device: str) -> list[str]:
        """Return the command prefix that runs a command in `device`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[device]]

    def listen_address(self, device: str, upstream: str) -> str:
        """Return a fresh ``HOST:PORT`` on which `device` can accept a link from `upstream`."""
        # Every run gets a new port, so no socket of an earlier run can hold it.
        return f"{self.addresses[(device, upstream)]}:{next(self._ports)}"

    def describe(self) -> str:
        """Return the shaping as one line for the benchmark output."""
        if self.duplex == "half":
            shaping = "one shared by both directions through an ifb device (half duplex)"
        else:
            shaping = "one on each end (full duplex: ifb, clsact, u32 or mirred is missing)"
        return (
            f"one network namespace per device, a veth pair per device pair, tc qdisc tbf rate {RATE} "
            f"burst {BURST} latency {QUEUE_LATENCY}: {shaping}"
        )


def _run(*command: str) -> None:
    subprocess.run(list(command), check=True, capture_output=True, text=True, timeout=30)


def _tbf(namespace: str, device: str) -> None:
    _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
         "rate", RATE, "burst", BURST, "latency", QUEUE_LATENCY)  # fmt: skip


def _shape_half_duplex(namespace: str, end: str, ifb: str) -> None:
    """Send both directions of veth end `end` through one token bucket on a new ifb device."""
    _run("ip", "-n", namespace, "link", "add", ifb, "type", "ifb")
    _run("ip", "-n", namespace, "link", "set", ifb, "up")
    _tbf(namespace, ifb)
    _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", end, "clsact")
    for direction in ("ingress", "egress"):
        _run("ip", "netns", "exec", namespace, "tc", "filter", "add", "dev", end, direction, "protocol", "all",
             "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb)  # fmt: skip


def _shape_pair(
    namespaces: tuple[str, str], ends: tuple[str, str], ifb: str, *, half_duplex: bool, fallback: bool
) -> bool:
    """Shape one veth pair and return whether it is half duplex.

    With `fallback`, a pair that cannot be half duplex is made full duplex;
    without it, the error propagates.
    """
    if half_duplex:
        try:
            _shape_half_duplex(namespaces[0], ends[0], ifb)
            return True
        except subprocess.CalledProcessError:
            if not fallback:
                raise
            # Undo what was set up, so that the full-duplex shaping starts clean.
            subprocess.run(["ip", "-n", namespaces[0], "link", "del", ifb], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "exec", namespaces[0], "tc", "qdisc", "del", "dev", ends[0], "clsact"],
                           capture_output=True, timeout=30)  # fmt: skip
    for namespace, end in zip(namespaces, ends):
        _tbf(namespace, end)
    return False


def _create(
    devices: Sequence[str], namespaces: dict[str, str], veths: list[str]
) -> tuple[dict[tuple[str, str], str], str]:
    addresses: dict[tuple[str, str], str] = {}
    half_duplex = True
    for device in devices:
        _run("ip", "netns", "add", namespaces[device])
        _run("ip", "-n", namespaces[device], "link", "set", "lo", "up")
    for index, (first, second) in enumerate(itertools.combinations(devices, 2)):
        # Interface names are limited to 15 characters.
        ends = (f"hsp{os.getpid() % 100000}{index}a", f"hsp{os.getpid() % 100000}{index}b")
        ifb = f"hsp{os.getpid() % 100000}{index}i"
        veths.append(ends[0])
        _run("ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        for end, device, host in ((ends[0], first, 1), (ends[1], second, 2)):
            address = f"{SUBNET}.{index}.{host}"
            namespace = namespaces[device]
            _run("ip", "link", "set", end, "netns", namespace)
            _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", end)
            _run("ip", "-n", namespace, "link", "set", end, "up")
        # The first pair tests whether half duplex works, and the others get the same shaping.
        half_duplex = _shape_pair(
            (namespaces[first], namespaces[second]), ends, ifb, half_duplex=half_duplex, fallback=index == 0
        )
        addresses[(first, second)] = f"{SUBNET}.{index}.1"
        addresses[(second, first)] = f"{SUBNET}.{index}.2"
    return addresses, "half" if half_duplex else "full"


def _delete(namespaces: dict[str, str], veths: list[str]) -> list[str]:
    """Delete the namespaces and any veth left in this namespace, and return what could not be deleted."""
    failed = []
    for namespace in namespaces.values():
        done = subprocess.run(["ip", "netns", "del", namespace], capture_output=True, text=True, timeout=30)
        if done.returncode != 0 and "No such file" not in done.stderr:
            failed.append(f"namespace {namespace}: {done.stderr.strip()}")
    # Deleting a namespace deletes the veth ends inside it. This catches a
    # pair left in this namespace when creation failed halfway.
    for veth in veths:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=30)
    return failed


@contextlib.contextmanager
def shaped_network(devices: Sequence[str]) -> Iterator[tuple[ShapedNetwork | None, str | None]]:
    """Yield (network, None), or (None, reason) where namespaces cannot be created.

    The namespaces and veth pairs are deleted on exit in every case.
    """
    namespaces = {device: f"hsplan-{os.getpid()}-{index}" for index, device in enumerate(devices)}
    veths: list[str] = []
    try:
        addresses, duplex = _create(devices, namespaces, veths)
    except (OSError, subprocess.SubprocessError) as error:
        _delete(namespaces, veths)
        detail = (getattr(error, "stderr", "") or str(error)).strip()
        yield None, f"network namespaces could not be created (needs root, iproute2 and tc): {detail}"
        return
    try:
        yield ShapedNetwork(namespaces=namespaces, addresses=addresses, duplex=duplex), None
    finally:
        failed = _delete(namespaces, veths)
        if failed:
            print(f"could not delete: {'; '.join(failed)}", file=sys.stderr)


def measure_pair_links(network: ShapedNetwork) -> dict[tuple[str, str], LinkProfile]:
    """Measure the link of every device pair, from a process in each of the two namespaces."""
    script = [sys.executable, os.path.abspath(__file__)]
    links = {}
    for first, second in itertools.combinations(network.namespaces, 2):
        address = network.listen_address(second, first)
        echo = start(network.prefix(second) + script + ["--role", "echo", "--listen", address])
        try:
            read_line(echo, PROBE_SECONDS, name="link probe echo")
            prober = start(network.prefix(first) + script + ["--role", "measure", "--connect", address])
            try:
                links[(first, second)] = LinkProfile.from_dict(json.loads(read_line(prober, PROBE_SECONDS, name="link prober")))
            finally:
                stop(prober)
        finally:
            stop(echo)
    return links


def _echo(listen: str) -> None:
    listener = open_listener(listen)
    print(json.dumps({"listening": listen}), flush=True)
    link = TcpTransport().accept(listener, local=ECHOER, expect=PROBER)
    listener.close()
    try:
        echo_link_probes(link)
    finally:
        link.close()


def _measure(connect: str) -> None:
    link = TcpTransport().dial(connect, local=PROBER, expect=ECHOER)
    try:
        # More round trips than measure_link's default of 9, because on a loaded
        # machine a median of 9 moved one pair's bandwidth by a quarter.
        profile = measure_link(link, repeats=PROBE_REPEATS)
    finally:
        link.close()
    print(json.dumps(profile.to_dict()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Link probe peer for the planner benchmark's shaped links.")
    parser.add_argument("--role", choices=["echo", "measure"], required=True, help="echo probes, or measure the link")
    parser.add_argument("--listen", help="HOST:PORT to accept the measuring peer on (echo)")
    parser.add_argument("--connect", help="HOST:PORT of the echoing peer (measure)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.role == "echo":
        _echo(args.listen)
    else:
        _measure(args.connect)


if __name__ == "__main__":
    main()
