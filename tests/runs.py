"""Compose the Hydra config in-process (fast) and run it on the simulator."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from node0sim.app import CONF_DIR
from node0sim.config import RunConfig, load_run_config
from node0sim.metrics import RunRecorder
from node0sim.sim.runner import run_simulation


def run_config(*overrides: str) -> RunConfig:
    """The validated config for ``overrides``, exactly as the CLI would build it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return load_run_config(OmegaConf.to_container(cfg, resolve=True))


def simulate(out_dir: Path, *overrides: str) -> dict:
    """Run on the simulator, quietly, writing into ``out_dir``."""
    run = run_config(*overrides)
    return run_simulation(run, out_dir, RunRecorder(out_dir, run.train.steps, stream=None))
