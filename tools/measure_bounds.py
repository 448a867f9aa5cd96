"""The largest |value| and loss of honest runs, against the bounds a reply must keep (``train.max_abs_value``,
``train.max_loss_ratio``: node0sim/protocol/bounds.py).

    .venv/bin/python tools/measure_bounds.py [--steps 200] [--seeds 0 1] [OVERRIDES ...]

Runs the default run (the demo preset), experiment=minimal and experiment=node0_tiny (compression=subspace), each seed,
on the simulator, and prints what the trainers accepted: the largest |value| of any activation, gradient or per-token
loss a stage replied (every tensor the next stage received), and the largest loss over ln(vocab size). Extra
overrides apply to every run.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node0sim.app import compose_run_config  # noqa: E402
from node0sim.metrics import RunRecorder  # noqa: E402
from node0sim.sim.runner import SimulatedRun  # noqa: E402

RUNS = {"default": (), "minimal": ("experiment=minimal",), "node0_tiny": ("experiment=node0_tiny", "compression=subspace")}
"""name: overrides (the default run is the demo preset; minimal's boundaries carry dense activations)."""


def measure(overrides: tuple[str, ...]) -> tuple[float, float, float]:
    """(largest |value|, largest loss, ln vocab size) the trainers of one run accepted."""
    run = compose_run_config(*overrides, "train.eval_batches=0", "wandb.enabled=false")
    with tempfile.TemporaryDirectory() as out:
        sim_run = SimulatedRun(run, Path(out), RunRecorder(Path(out), run.train.steps, stream=None))
        sim_run.execute()
    stats = [t.stats for t in sim_run.trainers]
    vocab = sim_run.templates[-1].cfg.vocab_size
    return max(s.largest_value for s in stats), max(s.largest_loss for s in stats), math.log(vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    for name, overrides in RUNS.items():
        for seed in args.seeds:
            largest, loss, log_vocab = measure((*overrides, f"train.steps={args.steps}", f"seed={seed}", *args.overrides))
            print(f"{name:10s} seed {seed}: largest |value| {largest:.4g}, largest loss {loss:.4f} = {loss / log_vocab:.3f} x ln V")


if __name__ == "__main__":
    main()
