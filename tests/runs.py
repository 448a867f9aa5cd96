"""Run a composed config on the simulator, quietly (tests use this instead of a subprocess)."""

from __future__ import annotations

from pathlib import Path

from node0sim.app import compose_run_config as run_config
from node0sim.metrics import RunRecorder
from node0sim.sim.runner import run_simulation

__all__ = ["run_config", "simulate"]


def simulate(out_dir: Path, *overrides: str) -> dict:
    """Run on the simulator, quietly, writing into ``out_dir``."""
    run = run_config(*overrides)
    return run_simulation(run, out_dir, RunRecorder(out_dir, run.train.steps, stream=None))
