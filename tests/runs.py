"""Run a composed config on the simulator, quietly (tests use this instead of a subprocess)."""

from __future__ import annotations

from pathlib import Path

from node0sim.app import compose_run_config as run_config
from node0sim.metrics import RunRecorder
from node0sim.sim.runner import run_simulation

__all__ = ["comparable", "run_config", "simulate"]

VOLATILE_SUMMARY_KEYS = {"wall_time_s", "outputs"}  # differ between two runs of the same config


def comparable(summary: dict) -> dict:
    """``summary`` without the keys that differ between runs of the same config (wall time, output paths)."""
    return {k: v for k, v in summary.items() if k not in VOLATILE_SUMMARY_KEYS}


def simulate(out_dir: Path, *overrides: str) -> dict:
    """Run on the simulator, quietly, writing into ``out_dir``."""
    run = run_config(*overrides)
    return run_simulation(run, out_dir, RunRecorder(out_dir, run.train.steps, stream=None))
