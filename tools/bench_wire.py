"""What one live RPC puts on the wire and what it costs, measured in the shaped-link lab (needs root).

    .venv/bin/python tools/bench_wire.py [--sizes 0,10000,...] [--repeats 5] [--mbps 10] [--out wire.json]

Two live peers (``swarm.node.LiveNode``: p2pd, DHT node, the RPC stream handler, exactly what stage
servers run) in two namespaces of :class:`swarm.netlab.NetLab`. The client calls an echo-like method
with a ``ForwardRequest`` of S payload bytes (a uint8 tensor; the reply is a 1-byte ``ForwardResponse``)
and reads the bytes its uplink shaper charged (``tc -s qdisc show dev eth0``: the tbf counts every segment with
its headers; the veth's own ``/sys/class/net/eth0/statistics/tx_bytes`` sees one header per GSO burst) before
and after each call. It measures, on the same pair of peers:

- **framing overhead** (link shaped at ``--mbps``): shaper-charged uplink bytes vs the RPC's encoded bytes
  (``swarm.wire.encode`` + this runtime's 8-byte length frames), fitted as
  ``wire = per_message_bytes + per_byte_factor * payload`` (least squares over the sizes): libp2p's
  yamux and noise framing, TCP/IP and Ethernet headers, multistream negotiation of the new stream;
- **per-call RPC time** (link unshaped): the median wall time of one call of S bytes, fitted as
  ``time = per_call_s + payload / software_bytes_per_s`` (the event loop, a hop to p2pd over a unix
  socket and back on each side, msgpack encode/decode, stream open and close);
- **transfer on a shaped link** (``--mbps``, uplink and downlink of both peers): each call's time
  against ``per_call_s + wire / rate`` of the kernel-counted bytes, first call on the connection
  (fresh TCP and yamux windows) and later ones;
- **one DHT operation** (link shaped at ``--mbps``): the median wall time of a ``dht_store`` of a
  stage-record-sized dictionary entry and of a ``dht_get`` of it, as the protocol issues them
  (``node0sim.protocol.progress``): what the simulator charges per operation (``sim.dht_latency_ms``);
- **two calls at once** (``--mbps``): two 1 MB calls to the same peer started together, each one's time: about
  equal when the connection shares the link between its streams (yamux interleaves their frames:
  ``sim.pair_streams=shared``), about 1 : 2 when it carries one message after the other (``serial``);
- **the path's round trip** (link shaped at ``--mbps``): the median time of a TCP connect (SYN, SYN-ACK) to the
  server's p2pd port: the RTT TCP itself sees in the lab (``sim.tcp_rtt_ms`` where latency is software-injected).
  :func:`lab_timings` runs these two parts alone, for ``experiments/fidelity.py``;
- **one DHT operation behind a bulk transfer** (``--mbps``): the same stores and gets while a 1 MB call to the
  same peer is on the wire. The shapers' queues are FIFO, so a small message waits for the bulk bytes queued
  ahead of it; the simulator's DHT (a fixed latency) and its fluid links (fair sharing) do not model that.

The lab has no kernel delay (no netem here; the RTT is the veths' and shapers' own), so window / RTT
limits cannot show in this tool: the transport model's window constants are cited, not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if TYPE_CHECKING:
    from swarm.netlab import LinkShape

ECHO = "bench_echo"
COUNTERS = "/sys/class/net/eth0/statistics/"


def _counters() -> tuple[int, int]:
    """(bytes the uplink shaper charged, veth rx bytes) of this namespace's eth0: see ``NetLab.shaped_bytes``."""
    from swarm.netlab import qdisc_sent_bytes

    return qdisc_sent_bytes("eth0"), int(Path(COUNTERS + "rx_bytes").read_text())


async def _serve(host: str, info: Path) -> None:
    """Inside the server's namespace: a live peer answering ``bench_echo`` with one byte, until killed."""
    import torch

    from node0sim.protocol.messages import ForwardResponse
    from swarm.node import LiveNode, NodeSettings

    node = await LiveNode.start(NodeSettings(host=host))

    async def echo(_caller: str, _request):
        return ForwardResponse(torch.zeros(1, dtype=torch.uint8))

    node.runtime.serve(ECHO, echo)
    info.write_text(json.dumps(node.visible_maddrs))
    try:
        await asyncio.Event().wait()
    finally:
        await node.stop()


async def _dht_times(node, repeats: int, pause_s: float = 0.3) -> dict[str, list[float]]:
    """Seconds of ``repeats`` + 1 stores and gets of this peer's signed entry of a dictionary record (the first: the
    cold path), ``pause_s`` apart (the protocol's operations are spaced out too)."""
    times: dict[str, list[float]] = {"store": [], "get": []}
    record = {"ready": True, "throughput": 1.0e12, "samples": 123456, "epoch": 7, "time": time.time()}
    for attempt in range(repeats + 1):
        await asyncio.sleep(pause_s)
        start = time.perf_counter()
        await node.runtime.dht_store("bench_dht_stage", record, expires_in=60.0, per_peer=True)
        times["store"].append(time.perf_counter() - start)
        start = time.perf_counter()
        value = await node.runtime.dht_get("bench_dht_stage")
        times["get"].append(time.perf_counter() - start)
        if not value:
            raise RuntimeError("bench_wire: the DHT record just stored was not read back")
    return times


def _connect_times(maddr: str, repeats: int) -> list[float]:
    """Seconds of ``repeats`` TCP connects (one round trip each) to the ``/ip4/<ip>/tcp/<port>`` of ``maddr``."""
    import socket

    parts = maddr.split("/")
    address = (parts[2], int(parts[4]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with socket.create_connection(address, timeout=10):
            times.append(time.perf_counter() - start)
    return times


async def _client(host: str, server: list[str], sizes: list[int], repeats: int, out: Path) -> None:
    """Inside the client's namespace: time and count ``repeats`` calls per size (the first call of all separately),
    then ``repeats`` DHT stores and gets."""
    import torch

    from node0sim.protocol.messages import ForwardRequest
    from swarm import wire
    from swarm.node import LiveNode, NodeSettings

    node = await LiveNode.start(NodeSettings(host=host, initial_peers=tuple(server)))
    peer = server[0].rsplit("/", 1)[1]
    points = []
    try:
        for size in sizes:
            request = ForwardRequest(0, torch.zeros(size, dtype=torch.uint8))
            encoded = len(wire.encode(request)) + 2 * 8 + len(ECHO)  # the runtime's two length-prefixed frames
            for attempt in range(repeats):
                await asyncio.sleep(0.3)  # let background DHT traffic settle (it counts too)
                tx0, rx0 = _counters()
                start = time.perf_counter()
                await node.runtime.call(peer, ECHO, request, 600)
                seconds = time.perf_counter() - start
                tx1, rx1 = _counters()
                points.append({"payload": encoded, "size": size, "attempt": attempt, "first": not points,
                               "seconds": seconds, "tx": tx1 - tx0, "rx": rx1 - rx0})
        dht = await _dht_times(node, repeats)
        loaded = await _dht_times_behind(node, peer, repeats) if sizes else None
        together = [await _two_calls_at_once(node, peer) for _ in range(repeats)] if sizes else None
    finally:
        await node.stop()
    rtt = _connect_times(server[0], repeats)
    out.write_text(json.dumps({"calls": points, "dht": dht, "dht_loaded": loaded, "together": together, "rtt": rtt}))


async def _two_calls_at_once(node, peer: str, nbytes: int = 1_000_000) -> list[float]:
    """Seconds each of two ``nbytes`` calls to ``peer`` took, both started at once (the faster first)."""
    import torch

    from node0sim.protocol.messages import ForwardRequest

    request = ForwardRequest(0, torch.zeros(nbytes, dtype=torch.uint8))

    async def timed() -> float:
        start = time.perf_counter()
        await node.runtime.call(peer, ECHO, request, 600)
        return time.perf_counter() - start

    await asyncio.sleep(0.3)
    return sorted(await asyncio.gather(timed(), timed()))


async def _dht_times_behind(node, peer: str, repeats: int, bulk_bytes: int = 1_000_000) -> dict[str, list[float]]:
    """DHT store and get times, each pair started 50 ms into a ``bulk_bytes`` call to ``peer`` (awaited after)."""
    import torch

    from node0sim.protocol.messages import ForwardRequest

    request = ForwardRequest(0, torch.zeros(bulk_bytes, dtype=torch.uint8))
    times: dict[str, list[float]] = {"store": [], "get": []}
    for _ in range(repeats):
        bulk = asyncio.ensure_future(node.runtime.call(peer, ECHO, request, 600))
        await asyncio.sleep(0.05)
        for kind, part in (await _dht_times(node, 0, pause_s=0.0)).items():
            times[kind] += part
        await bulk
    return times


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def _measure(sizes: list[int], repeats: int, shape: "LinkShape", folder: Path) -> dict:
    """Calls of each size and DHT operations between two lab peers whose links have ``shape``."""
    from swarm.netlab import NetLab

    env_prefix = ["env", "OMP_NUM_THREADS=1", f"NODE0SIM_RUNTIME_DIR={folder}/rt"]
    with NetLab("n0wire-", [shape, shape]) as lab:
        info, out = folder / "server.json", folder / "points.json"
        info.unlink(missing_ok=True)
        server = subprocess.Popen(lab.command(0, [*env_prefix, sys.executable, __file__, "_serve", lab.address(0), str(info)], [0]))
        try:
            for _ in range(600):
                if info.is_file() or server.poll() is not None:
                    break
                time.sleep(0.1)
            if not info.is_file():
                raise RuntimeError("the echo peer did not start")
            subprocess.run(lab.command(1, [*env_prefix, sys.executable, __file__, "_client", lab.address(1), info.read_text(),
                                           ",".join(map(str, sizes)), str(repeats), str(out)], [1]), check=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
        return json.loads(out.read_text())


def lab_timings(up_mbps: float | None, down_mbps: float | None, repeats: int = 10) -> dict[str, float]:
    """Between two lab peers whose links are shaped to ``up_mbps`` / ``down_mbps`` (None: unshaped): ``dht_s``, the
    median seconds of one DHT store or get (warm: the first of each left out), and ``rtt_s``, the median TCP connect."""
    from swarm.netlab import LinkShape

    with tempfile.TemporaryDirectory(prefix="n0w") as scratch:
        measured = _measure([], repeats, LinkShape(up_mbps, down_mbps), Path(scratch))
    dht = measured["dht"]
    return {"dht_s": statistics.median(dht["store"][1:] + dht["get"][1:]), "rtt_s": statistics.median(measured["rtt"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="measure", choices=["measure", "_serve", "_client"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--sizes", default="0,30000,100000,300000,1000000,3000000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mbps", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    if options.what == "_serve":
        asyncio.run(_serve(options.args[0], Path(options.args[1])))
        return
    if options.what == "_client":
        host, server, sizes, repeats, out = options.args
        asyncio.run(_client(host, json.loads(server), [int(s) for s in sizes.split(",") if s], int(repeats), Path(out)))
        return
    from swarm.netlab import LinkShape

    sizes = [int(s) for s in options.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="n0w") as scratch:
        unshaped = _measure(sizes, options.repeats, LinkShape(None, None), Path(scratch))
        measured = _measure(sizes, options.repeats, LinkShape(options.mbps, options.mbps), Path(scratch))
    shaped, dht, loaded, together = measured["calls"], measured["dht"], measured["dht_loaded"], measured["together"]
    unshaped = unshaped["calls"]
    warm_shaped = [p for p in shaped if not p["first"]]
    per_message, factor = _fit([p["payload"] for p in warm_shaped], [p["tx"] for p in warm_shaped])
    warm = [p for p in unshaped if not p["first"]]
    by_size = {s: [p for p in warm if p["size"] == s] for s in sizes}
    medians = {s: statistics.median(p["seconds"] for p in points) for s, points in by_size.items()}
    payloads = {s: points[0]["payload"] for s, points in by_size.items()}
    per_call, per_byte = _fit([payloads[s] for s in sizes], [medians[s] for s in sizes])
    result = {
        "framing": {"per_message_bytes": per_message, "per_byte_factor": factor},
        "rpc": {"per_call_s": per_call, "software_bytes_per_s": 1 / per_byte if per_byte > 0 else None,
                "median_s_by_size": medians},
        "shaped_mbps": options.mbps,
        "shaped": [{**p, "predicted_s": per_call + p["tx"] * 8 / (options.mbps * 1e6)} for p in shaped],
        "unshaped": unshaped,
        "dht": {"store_s": statistics.median(dht["store"][1:]), "get_s": statistics.median(dht["get"][1:]),
                "first_store_s": dht["store"][0], "first_get_s": dht["get"][0]},
        "dht_behind_bulk": {"store_s": statistics.median(loaded["store"]), "get_s": statistics.median(loaded["get"])},
        "two_calls_at_once_s": together,
        "two_calls_at_once_ratio": statistics.median(first / second for first, second in together),
        "rtt_s": statistics.median(measured["rtt"]),
    }
    print(f"framing ({options.mbps:g} Mb/s, {len(warm_shaped)} calls): "
          f"shaper-charged uplink bytes = {per_message:.0f} B + {factor:.4f} x payload")
    rate = f" + payload / {1 / per_byte / 1e6:.0f} MB/s" if per_byte > 0 else ""
    print(f"per-call RPC time (unshaped): {per_call * 1000:.2f} ms{rate}")
    for s in sizes:
        print(f"  {s:>9} B payload: median {medians[s] * 1000:8.2f} ms")
    print(f"shaped {options.mbps:g} Mb/s: call time vs per_call + kernel bytes / rate")
    for p in result["shaped"]:
        print(f"  {p['size']:>9} B {'first' if p['first'] else 'warm ':5} measured {p['seconds'] * 1000:8.1f} ms, "
              f"per_call + wire/rate {p['predicted_s'] * 1000:8.1f} ms, kernel tx {p['tx']} B")
    print(f"DHT ({options.mbps:g} Mb/s, {options.repeats} each, warm): store median {result['dht']['store_s'] * 1000:.1f} ms, "
          f"get median {result['dht']['get_s'] * 1000:.1f} ms (first: {dht['store'][0] * 1000:.1f} / {dht['get'][0] * 1000:.1f} ms); "
          f"TCP connect (the path's RTT) median {result['rtt_s'] * 1000:.2f} ms")
    behind = result["dht_behind_bulk"]
    print(f"two 1 MB calls at once: the first done at {result['two_calls_at_once_ratio']:.2f} x the second's time "
          "(1: shared, 0.5: one after the other)")
    print(f"DHT behind a 1 MB call: store median {behind['store_s'] * 1000:.1f} ms, get median {behind['get_s'] * 1000:.1f} ms")
    if options.out:
        options.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
