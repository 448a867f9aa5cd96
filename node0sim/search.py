"""Search objectives: the number a run returns to a search sweeper (``search.objective``; Hydra's Optuna sweeper).

Each objective is minimized and written, with what it was computed from, to ``<run dir>/search.json`` (what
``experiments/report.py`` reads for the search's best trial and history).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from node0sim.app import CONF_DIR
from node0sim.config import NetworkConfig, RunConfig, build_section
from node0sim.metrics import RunRecorder, write_json_atomic

SEARCH_FILE = "search.json"


def datacenter_network() -> NetworkConfig:
    """The ``network=datacenter`` preset (``conf/network/datacenter.yaml``)."""
    node = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "network" / "datacenter.yaml"))
    return build_section(NetworkConfig, node, "network")


def datacenter_tokens_per_s(run: RunConfig) -> float:
    """Tokens/s of ``run`` simulated again with datacenter bandwidth (the ``network=datacenter`` up and down rates;
    the run's own latency and regions), without wandb, its outputs discarded."""
    from node0sim.sim.runner import run_simulation

    datacenter = datacenter_network()
    network = dataclasses.replace(run.network, up_mbps=datacenter.up_mbps, down_mbps=datacenter.down_mbps)
    reference = dataclasses.replace(run, network=network, wandb=dataclasses.replace(run.wandb, enabled=False))
    with tempfile.TemporaryDirectory(prefix="node0sim-datacenter-") as out_dir:
        summary = run_simulation(reference, Path(out_dir), RunRecorder(Path(out_dir), run.train.steps, stream=None))
    return summary["tokens_per_s"]


def time_to_loss(steps: list[dict[str, Any]], target: float, window: int) -> float | None:
    """Virtual time (``time_s``) of the first step at which the mean training loss of the last ``window`` steps is
    at most ``target``; None if it never is."""
    losses = []
    for record in steps:
        losses.append(record["loss"])
        if len(losses) >= window and sum(losses[-window:]) / window <= target:
            return record["time_s"]
    return None


def read_loss_steps(out_dir: Path) -> list[dict[str, Any]]:
    """The step records of ``metrics.jsonl`` that carry a finite training loss, in order."""
    steps = []
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record and isinstance(record.get("loss"), float) and math.isfinite(record["loss"]):
            steps.append(record)
    return steps


def objective_value(run: RunConfig, summary: dict[str, Any], out_dir: Path) -> float:
    """``run.search.objective`` for the finished run in ``out_dir`` (infinity: infeasible / target not reached);
    also written to ``out_dir/search.json``."""
    search = run.search
    if search.objective == "min_uplink":
        reference = datacenter_tokens_per_s(run)
        ratio = summary["tokens_per_s"] / reference
        value = run.network.up_mbps if ratio >= search.throughput_fraction else math.inf
        record = {"throughput_fraction": search.throughput_fraction, "tokens_per_s": summary["tokens_per_s"],
                  "datacenter_tokens_per_s": reference, "throughput_ratio": ratio, "up_mbps": run.network.up_mbps}
    elif search.objective == "time_to_loss":
        reached = time_to_loss(read_loss_steps(out_dir), search.target_loss, search.loss_window)
        value = math.inf if reached is None else reached
        record = {"target_loss": search.target_loss, "loss_window": search.loss_window, "loss_last": summary["loss_last"],
                  "sim_time_s": summary["sim_time_s"]}
    else:
        raise ValueError(f"search.objective: {search.objective!r} has no value")
    write_json_atomic(Path(out_dir) / SEARCH_FILE, {"objective": search.objective, "value": value, **record})
    return value
