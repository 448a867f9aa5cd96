"""A shaped-link lab for live peers: one Linux network namespace per peer, kernel-shaped links.

Layout (all names start with the lab's ``prefix``, so leftovers can be found and removed):

- a bridge namespace ``<prefix>br`` holding a Linux bridge ``br0``;
- per peer a namespace ``<prefix><i>`` whose ``eth0`` is one end of a veth pair; the other end,
  ``v<i>``, is created directly inside the bridge namespace and enslaved to ``br0`` (nothing is
  created in the machine's own namespace);
- addresses from 10.201.0.0/24 (RFC 1918 private space), which exist only inside these namespaces:
  traffic can reach nothing outside them. (Not RFC 2544's benchmarking range 198.18.0.0/15: libp2p's
  DHT, inside p2pd, treats that range as unroutable and drops such peers, seen here as "routing: not found");
- each peer's uplink is a ``tbf`` on its ``eth0`` (what leaves the peer), its downlink a ``tbf`` on
  ``v<i>`` in the bridge namespace (what leaves the bridge towards the peer): a tbf shapes egress only.

Latency: the kernel here has no ``netem`` (checked by :func:`available_qdiscs` at start), so the lab
adds none. Runs that need one-way latency set ``swarm.injected_latency_ms``: the live runtime then
sleeps that long before it writes each RPC message (request or response), a software-injected delay
on its own send path (outputs label it so). It delays whole messages, not packets: TCP's ACK clock
still sees the kernel's RTT (the shaper's queueing delay only).

Cleanup: :meth:`NetLab.close` (also on ``with`` exit, Ctrl-C and SIGTERM through the context manager)
kills every process still inside the lab's namespaces (they can only be the lab's) and deletes the
namespaces, which removes the veth pairs and qdiscs with them. A lab killed with SIGKILL leaves them:
the next lab with the same prefix removes them at start, once the owner recorded in
``<runtime dir>/netlab-<prefix>.pid`` is gone (as :func:`swarm.lifecycle.clean_leftovers` does for sockets).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

SUBNET = ipaddress.ip_network("10.201.0.0/24")
"""Peer addresses: private (RFC 1918), and present only inside the lab's namespaces."""

QDISC_PROBES = {  # kind: arguments of a minimal valid instance
    "tbf": "rate 10mbit burst 16kb latency 50ms",
    "htb": "default 1",
    "pfifo": "limit 100",
    "bfifo": "limit 100000",
    "netem": "delay 10ms",
}

TBF_MIN_BURST_BYTES = 4096
"""Smallest token bucket (a few MTU-sized frames): a deeper bucket lets each message's first bytes pass at veth speed
(a 16 KiB bucket made a 100 kB transfer at 2 Mb/s 11% faster than the rate, measured here with a raw TCP transfer)."""

TBF_BURST_S = 0.002
"""Bucket depth in time at the link rate (tc-tbf(8): the bucket must hold at least rate / HZ; 2 ms covers HZ >= 500).
Measured here (raw TCP, 8 MB): 1 ms gave 92.9% goodput at 50 Mb/s, 4 ms 94.8%."""

TBF_QUEUE_S = 0.2
"""How long a packet may wait in the shaper's queue before it is dropped (``tbf latency``): a 200 ms droptail buffer,
as in the reference measurement (transport-and-fidelity.md: tbf ... latency 200ms, 95.5% goodput at 20 Mb/s);
access links buffer that much or more (bufferbloat)."""

PREFIX_PATTERN = re.compile(r"^[a-z0-9-]{1,10}$")


class NetLabError(RuntimeError):
    """The lab cannot be built or used here; the message says why."""


@dataclass(frozen=True)
class LinkShape:
    """One peer's access link: uplink and downlink rates in Mb/s (None: unshaped)."""

    up_mbps: float | None
    down_mbps: float | None

    def __post_init__(self) -> None:
        for name in ("up_mbps", "down_mbps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise NetLabError(f"{name}: must be > 0 Mb/s or None (unshaped), got {value}")


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetLabError(f"`{' '.join(cmd)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``/``tc``), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not installed"
    return None


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


def available_qdiscs(prefix: str) -> dict[str, bool]:
    """Which of tbf, htb, pfifo, bfifo and netem this kernel accepts (tried on ``lo`` of a scratch namespace)."""
    probe = f"{prefix}probe"
    _run(["ip", "netns", "add", probe])
    try:
        _run(["ip", "-n", probe, "link", "set", "lo", "up"])
        found = {}
        for kind, args in QDISC_PROBES.items():
            added = _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", kind, *args.split()], check=False)
            found[kind] = added.returncode == 0
            if found[kind]:
                _run(["ip", "netns", "exec", probe, "tc", "qdisc", "del", "dev", "lo", "root"])
        return found
    finally:
        _run(["ip", "netns", "del", probe], check=False)


def tbf_args(rate_mbps: float) -> list[str]:
    """``tc qdisc ... tbf`` arguments for a link of ``rate_mbps`` (burst and queue from the constants above)."""
    burst = max(TBF_MIN_BURST_BYTES, int(rate_mbps * 1e6 / 8 * TBF_BURST_S))
    return ["tbf", "rate", f"{rate_mbps:g}mbit", "burst", str(burst), "latency", f"{TBF_QUEUE_S * 1000:g}ms"]


def qdisc_sent_bytes(device: str, namespace: str | None = None) -> int:
    """The ``Sent <n> bytes`` of the root tbf on ``device`` (in ``namespace``, or the caller's own); 0 if it has none."""
    enter = ["ip", "netns", "exec", namespace] if namespace else []
    shown = _run([*enter, "tc", "-s", "qdisc", "show", "dev", device]).stdout
    match = re.search(r"qdisc tbf .*?Sent (\d+) bytes", shown, re.S)
    return int(match.group(1)) if match else 0


def _state_file(prefix: str) -> Path:
    from swarm.lifecycle import runtime_dir

    return runtime_dir() / f"netlab-{prefix}.pid"


def _pids_in(namespace: str) -> list[int]:
    result = _run(["ip", "netns", "pids", namespace], check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def _kill_pids(pids: list[int], grace_s: float) -> None:
    """SIGTERM ``pids``, SIGKILL those still alive after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.1)
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def remove_namespaces(prefix: str, grace_s: float = 5.0) -> list[str]:
    """Kill the processes inside every namespace named ``<prefix>...`` and delete those namespaces."""
    names = [n for n in list_namespaces() if n.startswith(prefix)]
    pids = sorted({pid for name in names for pid in _pids_in(name)})
    if pids:
        _kill_pids(pids, grace_s)
    for name in names:
        _run(["ip", "netns", "del", name], check=False)
    return names


def clean_leftovers(prefix: str) -> list[str]:
    """Remove what a dead lab with this prefix left (namespaces, their processes); fail if its owner still runs."""
    state = _state_file(prefix)
    if state.is_file():
        owner = int(state.read_text().strip() or 0)
        if owner and owner != os.getpid() and Path(f"/proc/{owner}").exists() and not _is_zombie(owner):
            raise NetLabError(f"a lab with prefix {prefix!r} is running in process {owner}: stop it or choose another prefix")
    removed = remove_namespaces(prefix)
    state.unlink(missing_ok=True)
    if removed:
        log.warning("removed %d namespace(s) a crashed lab left behind: %s", len(removed), removed)
    return removed


class NetLab:
    """Per-peer namespaces on a shaped bridge. ``with NetLab(prefix, shapes) as lab:`` builds and removes it.

    ``shapes`` gives each peer's link (peer ``i`` gets address ``lab.address(i)``, namespace
    ``lab.namespace(i)``); :meth:`command` wraps a command line to run inside a peer's namespace.
    """

    def __init__(self, prefix: str, shapes: Sequence[LinkShape]):
        if not PREFIX_PATTERN.match(prefix):
            raise NetLabError(f"prefix {prefix!r}: 1-10 characters of a-z, 0-9 and '-' (namespace names are made from it)")
        if not 1 <= len(shapes) <= SUBNET.num_addresses - 2:
            raise NetLabError(f"a lab holds 1 to {SUBNET.num_addresses - 2} peers, got {len(shapes)}")
        reason = unavailable_reason()
        if reason:
            raise NetLabError(reason)
        self.prefix = prefix
        self.shapes = list(shapes)
        self.bridge = f"{prefix}br"
        self.qdiscs: dict[str, bool] = {}
        self._built = False

    def namespace(self, index: int) -> str:
        """Namespace of peer ``index``."""
        return f"{self.prefix}{index}"

    def address(self, index: int) -> str:
        """IPv4 address of peer ``index`` (inside the lab only)."""
        return str(SUBNET.network_address + index + 1)

    def bridge_port(self, index: int) -> str:
        """The bridge-side veth of peer ``index`` (in the bridge namespace); its egress is the peer's downlink."""
        return f"v{index}"

    def __enter__(self) -> "NetLab":
        self.build()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def build(self) -> None:
        """Check the qdiscs, clean leftovers of a crashed lab, create namespaces, veths, bridge and shapers."""
        clean_leftovers(self.prefix)
        state = _state_file(self.prefix)
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(str(os.getpid()))
        self._built = True
        try:
            self.qdiscs = available_qdiscs(self.prefix)
            log.info("qdiscs this kernel offers: %s; missing: %s (the lab adds no kernel delay)",
                     [k for k, ok in self.qdiscs.items() if ok], [k for k, ok in self.qdiscs.items() if not ok] or "none")
            if not self.qdiscs["tbf"]:
                raise NetLabError("this kernel has no tbf qdisc: links cannot be shaped")
            self._build_topology()
        except BaseException:
            self.close()
            raise

    def _build_topology(self) -> None:
        br = self.bridge
        _run(["ip", "netns", "add", br])
        _run(["ip", "-n", br, "link", "set", "lo", "up"])
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        for index, shape in enumerate(self.shapes):
            ns, port = self.namespace(index), self.bridge_port(index)
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", br, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", br, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(index)}/{SUBNET.prefixlen}", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            if shape.up_mbps is not None:
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf_args(shape.up_mbps)])
            if shape.down_mbps is not None:
                _run(["ip", "netns", "exec", br, "tc", "qdisc", "add", "dev", port, "root", *tbf_args(shape.down_mbps)])

    def command(self, index: int, argv: Sequence[str], cores: Sequence[int] | None = None) -> list[str]:
        """``argv`` run inside peer ``index``'s namespace (pinned to ``cores`` with taskset, if given)."""
        pin = ["taskset", "-c", ",".join(map(str, cores))] if cores else []
        return ["ip", "netns", "exec", self.namespace(index), *pin, *argv]

    def cut(self, index: int) -> None:
        """Disconnect peer ``index`` (its bridge port down): what it sends and what is sent to it is dropped without a
        reset, as when a host loses its network; its processes keep running."""
        _run(["ip", "-n", self.bridge, "link", "set", self.bridge_port(index), "down"])

    def shaped_bytes(self, index: int) -> dict[str, int]:
        """Bytes peer ``index``'s shapers have sent so far (``tc -s qdisc``): ``up`` and ``down``, 0 where unshaped.

        The shaper charges each segment of a GSO burst with its own headers, so these are the bytes the link carried;
        the veth counters of :meth:`counters` see one header per GSO burst (no ``ethtool`` here to turn GSO off).
        """
        return {"up": qdisc_sent_bytes("eth0", self.namespace(index)), "down": qdisc_sent_bytes(self.bridge_port(index), self.bridge)}

    def counters(self, index: int) -> dict[str, int]:
        """Bytes the kernel counted on peer ``index``'s ``eth0``: ``tx_bytes`` (uplink), ``rx_bytes`` (downlink).

        They include every header below the application: Ethernet (14 B), IP, TCP, and libp2p's own framing.
        """
        out = _run(["ip", "netns", "exec", self.namespace(index), "cat",
                    "/sys/class/net/eth0/statistics/tx_bytes", "/sys/class/net/eth0/statistics/rx_bytes"]).stdout.split()
        return {"tx_bytes": int(out[0]), "rx_bytes": int(out[1])}

    def close(self) -> None:
        """Kill what runs in the lab and delete its namespaces (idempotent)."""
        if not self._built:
            return
        remove_namespaces(self.prefix)
        _state_file(self.prefix).unlink(missing_ok=True)
        self._built = False


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so that ``with NetLab(...)`` blocks are torn down on it too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
