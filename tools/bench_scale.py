"""How the simulator's wall time grows with the swarm: Node0-scale timing runs.

    .venv/bin/python tools/bench_scale.py [--peers 100 300 1000] [--virtual-s S] [--link-sharing equal] [--set KEY=VALUE ...]

Each run composes the preset ``experiment=scale_bench`` (conf/experiment/scale_bench.yaml: node0_8b in
timing mode, 32 stages, 32 trainers, volunteer churn, subspace compression at rate 100, Node0's
averaging settings), with ``--peers`` spread evenly over the stages; ``--virtual-s`` and
``--link-sharing`` override the preset's ``train.max_sim_time_s`` and ``sim.link_sharing``. Prints
wall time, SimPy events and events per second for each size, and the exponent b of
wall ~ peers^b from a least-squares fit in log-log space (b = 1 is linear).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node0sim.app import compose_run_config  # noqa: E402
from node0sim.metrics import RunRecorder  # noqa: E402
from node0sim.sim.network import SHARING_MODELS  # noqa: E402
from node0sim.sim.runner import SimulatedRun  # noqa: E402
from node0sim.sim.timers import scheduled_events  # noqa: E402


def scale_overrides(peers: int, virtual_s: float | None, link_sharing: str | None) -> list[str]:
    """Hydra overrides for a Node0-scale timing run with ``peers`` stage servers (None: the preset's value)."""
    overrides = ["experiment=scale_bench", f"topology.peers_per_stage={max(1, peers // 32)}"]
    if virtual_s is not None:
        overrides.append(f"train.max_sim_time_s={virtual_s}")
    if link_sharing is not None:
        overrides.append(f"sim.link_sharing={link_sharing}")
    return overrides


def measure(overrides: list[str]) -> tuple[float, int, float, dict]:
    """(wall seconds, SimPy events, virtual seconds, summary) of one run."""
    with tempfile.TemporaryDirectory() as out:
        run = compose_run_config(*overrides)
        sim_run = SimulatedRun(run, Path(out), RunRecorder(Path(out), run.train.steps, stream=None))
        start = time.perf_counter()
        summary = sim_run.execute()
        wall = time.perf_counter() - start
        events = scheduled_events(sim_run.sim.env)
    return wall, events, run.train.max_sim_time_s, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--virtual-s", type=float, default=None, help="virtual seconds per run (default: the preset's)")
    parser.add_argument("--link-sharing", default=None, choices=SHARING_MODELS, help="default: the preset's")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra Hydra overrides")
    args = parser.parse_args()
    points = []
    for peers in args.peers:
        wall, events, virtual_s, summary = measure([*scale_overrides(peers, args.virtual_s, args.link_sharing), *args.set])
        points.append((peers, wall))
        print(
            f"{peers:5d} peers, {virtual_s:g} s virtual: wall {wall:7.1f} s, {events:,} events, "
            f"{events / wall:,.0f} events/s, {summary['tokens_per_s']:,.0f} tok/s simulated, "
            f"churn {summary['churn_events']}",
            flush=True,
        )
    if len(points) >= 2:
        xs = [math.log(p) for p, _ in points]
        ys = [math.log(w) for _, w in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        print(f"growth exponent: wall ~ peers^{slope:.2f}")


if __name__ == "__main__":
    main()
