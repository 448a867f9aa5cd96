"""The ``node0sim`` command: a Hydra app that runs one experiment on the selected backend."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from node0sim.config import ConfigError, RunConfig, load_run_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_run_config(*overrides: str) -> RunConfig:
    """The validated config for ``overrides``, exactly as the command line builds it (for scripts and tests)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return load_run_config(OmegaConf.to_container(cfg, resolve=True))


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg`` and run it; returns the summary."""
    run_cfg = load_run_config(OmegaConf.to_container(cfg, resolve=True))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    from node0sim.sim.runner import run_simulation

    summary = run_simulation(run_cfg, out_dir)
    print(
        f"done: {summary['steps']} steps, {summary['tokens']} tokens in {summary['sim_time_s']:.1f} s of virtual time "
        f"({summary['wall_time_s']:.1f} s wall), {summary['tokens_per_s']:.1f} tok/s, "
        f"loss {summary['loss_first']} -> {summary['loss_last']}, val loss {summary['val_loss']}"
    )
    print(f"outputs in {out_dir}:")
    for path in summary["outputs"].values():
        print(f"  {path}")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as error:
        print(f"node0sim: configuration error: {error}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry point."""
    _hydra_main()
