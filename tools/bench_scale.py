"""How the simulator's wall time grows with the swarm: Node0-scale timing runs.

    .venv/bin/python tools/bench_scale.py [--peers 100 300 1000] [--virtual-s S] [--link-sharing equal] [--set KEY=VALUE ...]
        [--baseline OTHER_CHECKOUT]

Each run composes the preset ``experiment=scale_bench`` (conf/experiment/scale_bench.yaml: node0_8b in
timing mode, 32 stages, 32 trainers, volunteer churn, subspace compression at rate 100, Node0's
averaging settings), with ``--peers`` spread evenly over the stages; ``--virtual-s`` and
``--link-sharing`` override the preset's ``train.max_sim_time_s`` and ``sim.link_sharing``. Prints
wall time, SimPy events and events per second for each size, and the exponent b of
wall ~ peers^b from a least-squares fit in log-log space (b = 1 is linear), with the load average
before and after (the wall times of a shared machine mean little without it).

``--baseline DIR`` (a checkout of another commit, e.g. ``git worktree add /tmp/base HEAD~1``) times the same
runs on that code too, each size there and then here, each run in a fresh process, and prints the ratios of
wall and CPU times and whether the two summaries are identical (every key but ``wall_time_s`` and ``outputs``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node0sim.sim.network import SHARING_MODELS  # noqa: E402

VOLATILE_SUMMARY_KEYS = ("wall_time_s", "outputs")
"""Summary keys that differ between two runs of the same config."""

_MEASURE_IN_CHECKOUT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from tools.bench_scale import measure
cpu = time.process_time()
wall, events, virtual_s, summary = measure(json.loads(sys.argv[2]))
cpu = time.process_time() - cpu
print(json.dumps({"wall": wall, "cpu": cpu, "events": events, "virtual_s": virtual_s, "summary": summary}, default=str))
"""


def scale_overrides(peers: int, virtual_s: float | None, link_sharing: str | None) -> list[str]:
    """Hydra overrides for a Node0-scale timing run with ``peers`` stage servers (None: the preset's value)."""
    overrides = ["experiment=scale_bench", f"topology.peers_per_stage={max(1, peers // 32)}"]
    if virtual_s is not None:
        overrides.append(f"train.max_sim_time_s={virtual_s}")
    if link_sharing is not None:
        overrides.append(f"sim.link_sharing={link_sharing}")
    return overrides


def measure(overrides: list[str]) -> tuple[float, int, float, dict]:
    """(wall seconds, SimPy events, virtual seconds, summary) of one run in this process."""
    from node0sim.app import compose_run_config
    from node0sim.metrics import RunRecorder
    from node0sim.sim.runner import SimulatedRun
    from node0sim.sim.timers import scheduled_events

    with tempfile.TemporaryDirectory() as out:
        run = compose_run_config(*overrides)
        sim_run = SimulatedRun(run, Path(out), RunRecorder(Path(out), run.train.steps, stream=None))
        start = time.perf_counter()
        summary = sim_run.execute()
        wall = time.perf_counter() - start
        events = scheduled_events(sim_run.sim.env)
    return wall, events, run.train.max_sim_time_s, summary


def measure_in(checkout: Path, overrides: list[str]) -> tuple[float, int, float, dict, float]:
    """:func:`measure` in a fresh process on the code of ``checkout`` (its own ``tools/bench_scale.py``), and the CPU
    seconds that process spent in it (less sensitive than wall time to other jobs on a shared machine)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE_IN_CHECKOUT, str(checkout), json.dumps(overrides)],
        cwd=checkout, env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the run on {checkout} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["wall"], result["events"], result["virtual_s"], result["summary"], result["cpu"]


def comparable(summary: dict) -> str:
    """The summary without its volatile keys, as canonical JSON (to compare two runs exactly)."""
    return json.dumps({k: v for k, v in summary.items() if k not in VOLATILE_SUMMARY_KEYS}, sort_keys=True, default=str)


def growth_exponent(points: list[tuple[int, float]]) -> float:
    """Least-squares slope b of log(wall) = a + b log(peers)."""
    xs = [math.log(p) for p, _ in points]
    ys = [math.log(w) for _, w in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _line(peers: int, wall: float, events: int, virtual_s: float, summary: dict) -> str:
    return (
        f"{peers:5d} peers, {virtual_s:g} s virtual: wall {wall:7.1f} s, {events:,} events, "
        f"{events / wall:,.0f} events/s, {summary['tokens_per_s']:,.0f} tok/s simulated, churn {summary['churn_events']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--virtual-s", type=float, default=None, help="virtual seconds per run (default: the preset's)")
    parser.add_argument("--link-sharing", default=None, choices=SHARING_MODELS, help="default: the preset's")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra Hydra overrides")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of other code to time the same runs on")
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "tools" / "bench_scale.py").is_file():
        parser.error(f"--baseline: {args.baseline} is not a checkout of this repository (no tools/bench_scale.py)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores", flush=True)
    points, base_points = [], []
    for peers in args.peers:
        overrides = [*scale_overrides(peers, args.virtual_s, args.link_sharing), *args.set]
        if args.baseline is None:
            wall, events, virtual_s, summary = measure(overrides)
            print(_line(peers, wall, events, virtual_s, summary), flush=True)
        else:
            *base, base_cpu = measure_in(args.baseline.resolve(), overrides)
            print(f"  baseline: {_line(peers, *base)}, CPU {base_cpu:.1f} s", flush=True)
            wall, events, virtual_s, summary, cpu = measure_in(ROOT, overrides)
            same = "identical" if comparable(summary) == comparable(base[3]) else "DIFFERENT"
            print(f"  this code: {_line(peers, wall, events, virtual_s, summary)}, CPU {cpu:.1f} s", flush=True)
            print(f"  speed-up {base[0] / wall:.2f}x in wall time, {base_cpu / cpu:.2f}x in CPU time, summaries {same}", flush=True)
            base_points.append((peers, base[0]))
        points.append((peers, wall))
    if len(points) >= 2:
        print(f"growth exponent: wall ~ peers^{growth_exponent(points):.2f}")
        if base_points:
            print(f"growth exponent of the baseline: wall ~ peers^{growth_exponent(base_points):.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
