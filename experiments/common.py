"""Shared helpers for experiment scripts: run configs in-process and save their results (tables and plots: node0sim.reporting)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node0sim.app import compose_run_config  # noqa: E402
from node0sim.metrics import RunRecorder  # noqa: E402
from node0sim.sim.runner import run_simulation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_cell(out_dir: Path, *overrides: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one configuration on the simulator; returns its summary and metric records."""
    run = compose_run_config(*overrides)
    recorder = RunRecorder(out_dir, run.train.steps, stream=None)
    summary = run_simulation(run, out_dir, recorder)
    print(f"  {' '.join(overrides)}: {summary['tokens_per_s']:.1f} tok/s, loss {summary['loss_last']}", flush=True)
    return summary, recorder.records


def save_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
