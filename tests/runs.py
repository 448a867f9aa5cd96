"""Run a composed config on the simulator, quietly (tests use this instead of a subprocess).

Tests start from the minimal pipeline (``experiment=minimal``: one peer per stage, no churn, dense), not from the
default run (the demo swarm); an ``experiment=...`` among the overrides replaces it.
"""

from __future__ import annotations

from pathlib import Path

from node0sim.app import compose_run_config
from node0sim.config import RunConfig
from node0sim.metrics import RunRecorder
from node0sim.sim.runner import run_simulation

__all__ = ["MINIMAL", "comparable", "run_config", "simulate"]

MINIMAL = "experiment=minimal"
VOLATILE_SUMMARY_KEYS = {"wall_time_s", "outputs"}  # differ between two runs of the same config


def comparable(summary: dict) -> dict:
    """``summary`` without the keys that differ between runs of the same config (wall time, output paths)."""
    return {k: v for k, v in summary.items() if k not in VOLATILE_SUMMARY_KEYS}


def run_config(*overrides: str) -> RunConfig:
    """The validated config of the minimal pipeline with ``overrides`` (the last ``experiment=`` wins)."""
    return compose_run_config(MINIMAL, *overrides)


def simulate(out_dir: Path, *overrides: str) -> dict:
    """Run on the simulator, quietly, writing into ``out_dir``."""
    run = run_config(*overrides)
    return run_simulation(run, out_dir, RunRecorder(out_dir, run.train.steps, stream=None))
