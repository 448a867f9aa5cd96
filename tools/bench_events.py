"""Cost of one simulated protocol event against a raw SimPy timeout, measured in the same run.

    .venv/bin/python tools/bench_events.py [--processes 1000] [--events 200] [--repeats 5]

Workloads (same number of processes and virtual-time events each):
- raw SimPy: generator processes yielding ``env.timeout``;
- runtime sleep: protocol coroutines awaiting ``Runtime.sleep`` through the SimPy driver;
- runtime RPC: protocol coroutines calling a peer (request transfer, handler, response transfer),
  reported per RPC and per SimPy event it schedules.
Prints the median wall time of each and the ratios to raw SimPy.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import simpy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node0sim.sim.engine import Simulation  # noqa: E402
from node0sim.sim.gpus import gpu_profile  # noqa: E402
from node0sim.sim.timers import scheduled_events  # noqa: E402
from tools.timing import median_seconds  # noqa: E402


def raw_simpy_timeouts(processes: int, events: int) -> int:
    """``processes`` SimPy generators each waiting ``events`` timeouts; returns the event count."""
    env = simpy.Environment()

    def proc(i: int):
        for _ in range(events):
            yield env.timeout(1 + i % 7)

    for i in range(processes):
        env.process(proc(i))
    env.run()
    return processes * events


def _simulation(peers: int) -> Simulation:
    sim = Simulation(seed=0, latency_s=lambda a, b: 0.01, dht_latency_s=0.0)
    for i in range(peers):
        sim.add_peer(f"p{i}", region="r", up_mbps=100, down_mbps=100, gpu=gpu_profile("a100"), utilization=0.5)
    return sim


def runtime_sleeps(processes: int, events: int) -> int:
    """The same workload as protocol coroutines awaiting ``Runtime.sleep``."""
    sim = _simulation(1)
    rt = sim.peers["p0"].runtime

    async def proc(i: int):
        for _ in range(events):
            await rt.sleep(1 + i % 7)

    for i in range(processes):
        rt.spawn(proc(i))
    sim.run()
    return processes * events


@dataclass
class _Small:
    def wire_bytes(self) -> int:
        return 1000


def runtime_rpcs(processes: int, calls: int) -> tuple[int, int]:
    """Protocol coroutines doing RPCs between peer pairs; returns (RPCs, SimPy events scheduled)."""
    sim = _simulation(2 * processes)
    start = scheduled_events(sim.env)
    async def handler(caller, request):
        return request

    for i in range(processes):
        sim.peers[f"p{2 * i + 1}"].runtime.serve("echo", handler)

    async def proc(i: int):
        rt = sim.peers[f"p{2 * i}"].runtime
        for _ in range(calls):
            await rt.call(f"p{2 * i + 1}", "echo", _Small(), timeout=30.0)

    for i in range(processes):
        sim.peers[f"p{2 * i}"].runtime.spawn(proc(i))
    sim.run()
    return processes * calls, scheduled_events(sim.env) - start - 1  # the first reading used up one number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.processes * args.events
    raw = median_seconds(lambda: raw_simpy_timeouts(args.processes, args.events), args.repeats, warmup=False)
    sleeps = median_seconds(lambda: runtime_sleeps(args.processes, args.events), args.repeats, warmup=False)
    rpc_processes, rpc_calls = max(1, args.processes // 10), max(1, args.events // 10)
    rpcs, rpc_events = runtime_rpcs(rpc_processes, rpc_calls)
    rpc = median_seconds(lambda: runtime_rpcs(rpc_processes, rpc_calls), args.repeats, warmup=False)
    per_raw = raw / n
    print(f"raw SimPy timeout:        {per_raw * 1e6:8.2f} us/event  ({n} events)")
    print(f"runtime sleep (protocol): {sleeps / n * 1e6:8.2f} us/event  ratio {sleeps / raw:.2f}x raw SimPy")
    print(
        f"runtime RPC round trip:   {rpc / rpcs * 1e6:8.2f} us/RPC = {rpc_events / rpcs:.1f} SimPy events, "
        f"{rpc / rpc_events * 1e6:.2f} us/event, ratio {rpc / rpc_events / per_raw:.2f}x raw SimPy per event"
    )


if __name__ == "__main__":
    main()
