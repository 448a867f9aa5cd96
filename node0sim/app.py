"""The ``node0sim`` command: a Hydra app that runs one experiment on the selected backend."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from node0sim.config import ConfigError, RunConfig, load_run_config, schema
from node0sim.metrics import RunRecorder, read_complete_summary
from node0sim.summary import INCOMPLETE_EXIT, IncompleteRun, outcome_lines

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
MAX_DIRNAME = 160


def safe_dirname(text: str) -> str:
    """``text`` as one safe folder name: characters other than ``[A-Za-z0-9._,=+-]`` become ``_`` (no ``/``,
    no spaces, no shell specials); a name longer than MAX_DIRNAME is cut and ends in a hash of ``text``, so
    distinct override sets keep distinct folders and the same overrides always give the same folder."""
    safe = re.sub(r"[^A-Za-z0-9._,=+-]", "_", str(text))
    if len(safe) > MAX_DIRNAME:
        safe = safe[: MAX_DIRNAME - 9] + "-" + hashlib.sha1(str(text).encode()).hexdigest()[:8]
    return safe


# conf/config.yaml names sweep job folders with it: ${hydra.job.num}_${node0sim_safe_dirname:...}
OmegaConf.register_new_resolver("node0sim_safe_dirname", safe_dirname, replace=True)
# conf/experiment/demo.yaml finds its churn trace with it, wherever node0sim runs from
OmegaConf.register_new_resolver("node0sim_conf_dir", lambda: CONF_DIR, replace=True)
# conf/config.yaml composes everything onto it: the schema and its defaults (node0sim/config.py)
ConfigStore.instance().store(name="node0sim_schema", node=schema())


def compose_run_config(*overrides: str) -> RunConfig:
    """The validated config for ``overrides``, exactly as the command line builds it (for scripts and tests).

    Overrides Hydra refuses (unknown group option or key, a value of the wrong type) raise ConfigError too.
    """
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        config = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(str(error)) from None
    return load_run_config(config)


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg`` and run it; returns the summary.

    With ``train.skip_if_done=true`` a run whose output folder already holds a complete ``summary.json``
    prints "already done" and returns that summary (how an interrupted sweep resumes).
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    run_cfg = load_run_config(config)
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    if run_cfg.train.skip_if_done:
        done = read_complete_summary(out_dir)
        if done is not None:
            print(f"already done: {out_dir} has a complete summary.json (train.skip_if_done=true); not run again")
            return done
    from node0sim.tracking import make_sinks

    if run_cfg.backend == "swarm":
        from node0sim.assembly import trainer_steps
        from swarm.launch import run_swarm

        expected = {"steps": run_cfg.train.steps}

        def recorder_for(run: RunConfig, document: dict) -> RunRecorder:  # a trainer's config comes from the DHT
            expected["steps"] = trainer_steps(run, run_cfg.swarm.trainer_index)  # one trainer of several: its share
            return RunRecorder(out_dir, expected["steps"], sinks=make_sinks(run, document, out_dir))

        summary = run_swarm(config, run_cfg, out_dir, list(hydra_cfg.overrides.task), recorder_for)
        if summary is not None and run_cfg.swarm.role == "trainer":
            _print_done(summary, out_dir, [])
        if summary is not None:
            _check_complete(run_cfg, summary, expected["steps"])
        return summary
    from node0sim.sim.runner import run_simulation

    sinks = make_sinks(run_cfg, config, out_dir)
    # parallel sweep jobs share one terminal: plain progress lines tagged with the job number
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    recorder = RunRecorder(
        out_dir, run_cfg.train.steps, sinks=sinks, live=False if multirun else None,
        label=f"[job {hydra_cfg.job.num}] " if multirun else "",
    )
    try:
        summary = run_simulation(run_cfg, out_dir, recorder)
    except BaseException:
        recorder.close(None)
        raise
    _print_done(summary, out_dir, sinks)
    _check_complete(run_cfg, summary)
    return summary


def incomplete_run(run: RunConfig, summary: dict, expected_steps: int | None = None) -> str | None:
    """None if the run completed ``expected_steps`` (default ``train.steps``; a live trainer of several: its share);
    otherwise how many it did and the causes its own numbers show."""
    train = run.train
    expected = train.steps if expected_steps is None else expected_steps
    if summary["steps"] >= expected:
        return None
    causes = []
    if summary["backend"] == "sim" and train.max_sim_time_s is not None and summary["sim_time_s"] >= train.max_sim_time_s:
        causes.append(f"it stopped at train.max_sim_time_s={train.max_sim_time_s:g}")
    timed_out, no_peer = summary["timed_out_requests"], summary["no_peer_requests"]
    refused = summary["failed_requests"] - timed_out - no_peer
    if timed_out:
        every = not refused and summary["micro_batches_done"] == 0
        cause = f"every request timed out ({timed_out})" if every else f"{timed_out} requests timed out"
        if summary["backend"] == "sim":
            from node0sim.experiment import activation_bytes

            size = activation_bytes(run, run.model["dim"])
            link_mbps = min(run.network.up_mbps, run.network.down_mbps)
            seconds = size * 8 / (link_mbps * 1e6)
            if 3 * seconds >= train.request_timeout_s:  # a backward call carries two activations and returns one
                cause += (f": train.request_timeout_s={train.request_timeout_s:g} but one activation ({size / 1e6:.2f} MB) "
                          f"takes ~{seconds:.1f} s at these links ({link_mbps:g} Mb/s; a backward call moves three)")
        causes.append(cause)
    if refused:
        causes.append(f"{refused} requests were refused")
    if no_peer:
        causes.append(f"{no_peer} attempts found no available peer of a stage (none, or all banned for train.ban_s)")
    if summary["failed_probes"]:
        causes.append(f"{summary['failed_probes']} probes of listed peers got no answer within train.probe_timeout_s="
                      f"{train.probe_timeout_s:g} (those peers got no work)")
    if summary["dropped_micro_batches"]:
        causes.append(f"{summary['dropped_micro_batches']} micro-batches dropped after train.max_retries={train.max_retries}")
    if summary["micro_batches_in_flight"]:
        causes.append(f"{summary['micro_batches_in_flight']} micro-batches still in flight at the end")
    return f"incomplete run: {summary['steps']} of {expected} steps; {'; '.join(causes) or 'no failure was seen'}"


def _check_complete(run: RunConfig, summary: dict, expected_steps: int | None = None) -> None:
    """Say so (last line) when the run did fewer steps than asked; raise IncompleteRun unless train.allow_partial."""
    shortfall = incomplete_run(run, summary, expected_steps)
    if shortfall is None:
        return
    if not run.train.allow_partial:
        raise IncompleteRun(f"{shortfall}. Set train.allow_partial=true to accept a partial run")
    print(f"{shortfall} (accepted: train.allow_partial=true)")


def _print_done(summary: dict, out_dir: Path, sinks: list) -> None:
    clock = "virtual time" if summary["backend"] == "sim" else "wall-clock training time"

    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    print(
        f"done: {summary['steps']} steps, {summary['tokens']} tokens in {summary['sim_time_s']:.1f} s of {clock} "
        f"({summary['wall_time_s']:.1f} s wall), {summary['tokens_per_s']:.1f} tok/s, "
        f"loss {loss(summary['loss_first'])} -> {loss(summary['loss_last'])}, val loss {loss(summary['val_loss'])}"
    )
    for line in outcome_lines(summary):
        print(line)
    print(f"outputs in {out_dir}:")
    for path in summary["outputs"].values():
        print(f"  {path}")
    for sink in sinks:
        if getattr(sink, "location", None):
            print(f"  wandb ({sink.mode}): {sink.location}")


def search_objective(cfg: DictConfig, summary: dict) -> float | None:
    """The value a finished run returns to a search sweeper (``search.objective``, ``node0sim/search.py``), or None."""
    run_cfg = load_run_config(OmegaConf.to_container(cfg, resolve=True))
    if run_cfg.search.objective == "none":
        return None
    from node0sim.search import objective_value

    return objective_value(run_cfg, summary, Path(HydraConfig.get().runtime.output_dir))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return search_objective(cfg, run(cfg))
    except ConfigError as error:
        print(f"node0sim: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    except IncompleteRun as shortfall:
        print(f"node0sim: {shortfall}", file=sys.stderr, flush=True)
        sys.exit(INCOMPLETE_EXIT)


def main() -> None:
    """Console-script entry point."""
    _hydra_main()
