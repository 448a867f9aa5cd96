"""``node0sim backend=swarm``: run this process's role, or (``swarm.role=local``) a whole swarm."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from node0sim.config import ConfigError, RunConfig
from node0sim.metrics import RunRecorder
from node0sim.summary import INCOMPLETE_EXIT, ServerReport, with_server_reports
from swarm.lifecycle import SwarmError
from swarm.local import LocalSwarm
from swarm.roles import run_role

log = logging.getLogger("node0sim.swarm")


def run_swarm(
    config: Mapping[str, Any], run: RunConfig, out_dir: Path, overrides: Sequence[str],
    recorder_factory: Callable[[RunConfig, dict], RunRecorder],
) -> dict[str, Any] | None:
    """Run ``swarm.role``; returns the summary for trainers and the local role, None otherwise."""
    try:
        if run.swarm.role == "local":
            return run_local(run, out_dir, overrides)
        return run_role(config, run, recorder_factory)
    except SwarmError as error:
        print(f"node0sim: {error}", file=sys.stderr)
        sys.exit(1)


def run_local(run: RunConfig, out_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Bootstrap, ``num_stages x peers_per_stage`` servers and one trainer on 127.0.0.1, then a clean stop.

    Server ``s<i>p<k>`` serves stage i, or (``topology.stage_assignment=central``) the stage the organizer names; every
    server keeps checkpoints in ``swarm.checkpoint_dir`` if it is set.

    The trainer writes ``metrics.jsonl`` and ``summary.json`` into ``out_dir``; the servers' counters
    (averaging rounds, state downloads, ...) are added to the summary when they have stopped.
    """
    if run.topology.num_trainers != 1:
        raise ConfigError("swarm.role=local runs one trainer: set topology.num_trainers=1 (start more with swarm.role=trainer); "
                          "experiment=minimal starts from one trainer and one server per stage")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below on SIGTERM too
    swarm = LocalSwarm(overrides, out_dir / "swarm", admission=run.swarm.admission == "token")
    try:
        info = swarm.start_bootstrap(run.swarm.startup_timeout_s)
        print(f"local swarm: bootstrap {info['maddrs'][0]}, logs in {swarm.folder}", flush=True)
        central = run.topology.stage_assignment == "central"  # the organizer (the bootstrap peer) names each stage
        keeping = [f"swarm.checkpoint_dir={Path(run.swarm.checkpoint_dir).resolve()}",
                   f"swarm.checkpoint_every_epochs={run.swarm.checkpoint_every_epochs}"] if run.swarm.checkpoint_dir else []
        for stage in range(run.topology.num_stages):
            for k in range(run.topology.peers_per_stage):
                swarm.start_server(f"s{stage}p{k}", None if central else stage, *keeping)
        trainer = swarm.start(
            "trainer0", "trainer", f"hydra.run.dir={out_dir}", "hydra.output_subdir=null", "hydra.job.name=trainer",
            log_file=False,
        )
        if trainer.wait() not in (0, INCOMPLETE_EXIT):  # a partial run still has a summary (the check is repeated below)
            raise SwarmError(f"the trainer failed (exit code {trainer.returncode}); server logs are in {swarm.folder}")
    finally:
        codes = swarm.stop()
    failed = {name: code for name, code in codes.items() if code not in (0, None)}
    if failed:
        log.warning("peers that did not exit cleanly: %s (logs in %s)", failed, swarm.folder)
    summary = add_server_reports(out_dir / "summary.json", swarm.reports(), run)
    print(f"local swarm stopped; {summary['averaging_rounds']} averaging rounds across {summary['num_peers']} servers; "
          f"summary with their counters: {out_dir / 'summary.json'}", flush=True)
    return summary


def add_server_reports(summary_path: Path, reports: dict[str, ServerReport], run: RunConfig) -> dict[str, Any]:
    """Fill the summary's server-side keys from the servers' exit reports (by peer name); rewrite it."""
    if not summary_path.is_file():
        raise SwarmError(f"the trainer stopped before it finished (no {summary_path}); peer logs are next to it in swarm/")
    num_peers = run.topology.num_stages * run.topology.peers_per_stage
    summary = with_server_reports(json.loads(summary_path.read_text()), reports, run.topology.num_stages, num_peers)
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary
