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
  (fresh TCP and yamux windows) and later ones.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


async def _client(host: str, server: list[str], sizes: list[int], repeats: int, out: Path) -> None:
    """Inside the client's namespace: time and count ``repeats`` calls per size (the first call of all separately)."""
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
    finally:
        await node.stop()
    out.write_text(json.dumps(points))


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def _measure(sizes: list[int], repeats: int, mbps: float | None, folder: Path) -> list[dict]:
    from swarm.netlab import LinkShape, NetLab

    shape = LinkShape(mbps, mbps)
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
        asyncio.run(_client(host, json.loads(server), [int(s) for s in sizes.split(",")], int(repeats), Path(out)))
        return
    sizes = [int(s) for s in options.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="n0w") as scratch:
        unshaped = _measure(sizes, options.repeats, None, Path(scratch))
        shaped = _measure(sizes, options.repeats, options.mbps, Path(scratch))
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
    if options.out:
        options.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
