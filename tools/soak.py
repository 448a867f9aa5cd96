"""A soak run of the live swarm (documented, not in CI): churn and a lying peer on loopback, then the accounting.

    .venv/bin/python tools/soak.py [--steps 3000] [--hedge-quantile 0.95] [--probe-timeout-s 10] [--liar-kind nan|hang]
                                   [--freeze-s 20] [--out DIR]

Real processes on 127.0.0.1 (``swarm.local.LocalSwarm``, as in the live tests): a bootstrap, 2 stages x 2 servers and
one trainer of the tiny model. At fractions of the trainer's ``--steps``:

- 10%: a liar joins stage 1: a peer run by this script (``--liar``) that announces 1e6 samples/s and answers every tail
  call with NaN input gradients and a loss of 0.001 (``--liar-kind nan``), or accepts every call and never answers
  (``hang``: probes too, so with ``--probe-timeout-s`` the trainer never gives it work);
- 25%: server s1p0 is frozen (SIGSTOP) for ``--freeze-s`` seconds, then resumed (SIGCONT);
- 50%: server s0p1 is killed (SIGKILL);
- 60%: server s0p2 joins stage 0 (it downloads the stage's state).

It prints, and writes to ``<out>/soak.json``: steps/s in each phase between those events, the trainer's counters, the
accounting (micro-batches started = done + dropped; steps = done / micro-batches per step), every server's exit
report, what the liar served, and every process's exit code. Every process it started is stopped at the end, also on
Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from node0sim.app import compose_run_config  # noqa: E402
from node0sim.experiment import model_config, stage_computes, vocabulary_size  # noqa: E402
from node0sim.protocol.messages import TailResponse  # noqa: E402
from node0sim.protocol.stage_server import StageServer  # noqa: E402
from swarm.local import LocalSwarm  # noqa: E402
from swarm.node import LiveNode, NodeSettings  # noqa: E402

RUN = [  # the live tests' tiny run; windows wide enough for 8 processes on 2 cores
    "experiment=minimal", "topology.num_stages=2", "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=32",
    "train.eval_batches=1", "averaging.averaging_timeout_s=10", "averaging.matchmaking_time_s=2.5",
    "averaging.matchmaking_slack_s=1.0", "averaging.progress_period_s=1.0", "averaging.average_state_every=0",
    "wandb.enabled=false", "run_id=soak",
]
LIAR_THROUGHPUT = 1e6  # samples/s: far above any honest server's, so the router tries the liar first
LIAR_LOSS = 0.001
READY_TIMEOUT_S = 300.0
POLL_S = 0.5


class _NaNTail(StageServer):
    """The liar: every tail call gets NaN input gradients and a fake loss."""

    served = 0

    async def handle_tail(self, caller, request):
        _NaNTail.served += 1
        return TailResponse(LIAR_LOSS, torch.full_like(request.inputs, math.nan))


class _HangingTail(_NaNTail):
    """The liar of ``--liar-kind hang``: it accepts every call of its stage (a probe too) and never answers."""

    async def _hang(self, caller, request):
        _NaNTail.served += 1
        await asyncio.Event().wait()

    handle_forward = handle_backward = handle_tail = handle_probe = _hang


LIARS = {"nan": _NaNTail, "hang": _HangingTail}


async def _run_liar(kind: str, info_path: Path, report_path: Path) -> None:
    """Join the run's stage 1 as the ``kind`` liar until SIGTERM; write how many calls it got to ``report_path`` every
    second."""
    main = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main.cancel)
    info = json.loads(info_path.read_text())
    run = compose_run_config(*RUN)
    tail = stage_computes(run, model_config(run, vocabulary_size(run)))[-1]
    node = await LiveNode.start(NodeSettings(initial_peers=tuple(info["maddrs"])))
    try:
        server = LIARS[kind](node.runtime, run.run_id, tail, run.averaging, throughput=LIAR_THROUGHPUT,
                             bandwidth_mbps=run.network.up_mbps, max_abs_value=run.train.max_abs_value)
        await server.start()
        while True:
            report_path.write_text(json.dumps({"peer_id": node.runtime.peer_id, "tail_calls_served": _NaNTail.served}))
            await asyncio.sleep(1.0)
    finally:
        await node.stop()


def _steps(metrics: Path) -> int:
    """Steps the trainer has logged so far."""
    return sum('"step"' in line for line in metrics.read_text().splitlines()) if metrics.is_file() else 0


def _sees_its_partner(swarm: LocalSwarm, name: str) -> bool:
    log = swarm.folder / f"{name}.log"
    return log.is_file() and "Sees 1 other ready peer(s)" in log.read_text(errors="replace")


def _phases(events: list[dict]) -> list[dict]:
    """Steps/s of the trainer between consecutive events (this script's clock, polled every ``POLL_S``)."""
    return [{"from": a["event"], "to": b["event"], "steps": b["step"] - a["step"], "seconds": b["time_s"] - a["time_s"],
             "steps_per_s": (b["step"] - a["step"]) / (b["time_s"] - a["time_s"]) if b["time_s"] > a["time_s"] else None}
            for a, b in zip(events, events[1:])]


def soak(steps: int, freeze_s: float, hedge_quantile: float | None, out: Path, probe_timeout_s: float | None = None,
         liar_kind: str = "nan") -> dict:
    """Run the schedule of the module docstring; what happened, as written to ``soak.json``."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="n0-"))  # short: unix socket paths are limited to 107 characters
    swarm = LocalSwarm(RUN, out / "peers", extra_env={"NODE0SIM_RUNTIME_DIR": str(runtime_dir)})
    frozen_at, events = None, []
    metrics = out / "trainer" / "metrics.jsonl"
    liar_report = out / "liar-report.json"
    try:
        swarm.start_bootstrap()
        servers = [f"s{stage}p{k}" for stage in (0, 1) for k in (0, 1)]
        for name in servers:
            swarm.start_server(name, int(name[1]))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(_sees_its_partner(swarm, name) for name in servers):
            if time.monotonic() > deadline:
                raise SystemExit(f"the servers did not see each other within {READY_TIMEOUT_S:g} s (logs: {swarm.folder})")
            time.sleep(0.5)
        own = [f"train.{key}={value}" for key, value in (("hedge_quantile", hedge_quantile), ("probe_timeout_s", probe_timeout_s))
               if value is not None]
        trainer = swarm.start("trainer", "trainer", f"hydra.run.dir={out / 'trainer'}", f"train.steps={steps}",
                              "train.allow_partial=true", *own)

        def liar_joins() -> None:  # a process of the swarm's, so that swarm.stop() ends it too
            command = [sys.executable, __file__, "--liar-kind", liar_kind, "--liar", str(swarm.folder / "bootstrap.json"),
                       str(liar_report)]
            with open(swarm.folder / "liar.log", "ab") as output:
                swarm.processes["liar"] = subprocess.Popen(command, env=swarm.env, stdout=output, stderr=subprocess.STDOUT)

        def freeze() -> None:
            nonlocal frozen_at
            swarm.kill("s1p0", signal.SIGSTOP)
            frozen_at = time.monotonic()

        schedule = [(0.10, f"{liar_kind} liar joins stage 1", liar_joins), (0.25, "s1p0 frozen (SIGSTOP)", freeze),
                    (0.50, "s0p1 killed (SIGKILL)", lambda: swarm.kill("s0p1")),
                    (0.60, "s0p2 joins stage 0", lambda: swarm.start_server("s0p2", 0))]
        t0 = time.monotonic()

        def mark(event: str, done: int) -> None:
            events.append({"event": event, "step": done, "time_s": time.monotonic() - t0})

        mark("trainer started", 0)
        while trainer.poll() is None:
            done = _steps(metrics)
            while schedule and done >= schedule[0][0] * steps:
                _, event, action = schedule.pop(0)
                action()
                mark(event, done)
            if frozen_at is not None and time.monotonic() - frozen_at >= freeze_s:
                swarm.kill("s1p0", signal.SIGCONT)
                frozen_at = None
                mark("s1p0 resumed (SIGCONT)", done)
            time.sleep(POLL_S)
        mark("trainer ended", _steps(metrics))
    finally:
        if frozen_at is not None:
            swarm.kill("s1p0", signal.SIGCONT)  # a stopped process ignores SIGTERM until it runs again
        exit_codes = swarm.stop()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    summary_path = out / "trainer" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    per_step = compose_run_config(*RUN).train.micro_batches_per_step
    started, done, dropped = (summary.get(k, 0) for k in ("micro_batches_started", "micro_batches_done", "dropped_micro_batches"))
    return {
        "steps_asked": steps, "freeze_s": freeze_s, "hedge_quantile": hedge_quantile, "probe_timeout_s": probe_timeout_s,
        "liar_kind": liar_kind, "events": events,
        "phases": _phases(events),
        "trainer": {k: summary.get(k) for k in (
            "steps", "micro_batches_started", "micro_batches_done", "dropped_micro_batches", "micro_batches_in_flight",
            "failed_requests", "timed_out_requests", "no_peer_requests", "refused_requests", "lost_requests",
            "invalid_replies", "retried_requests", "unaccumulated_retries", "hedged_requests", "hedges_won", "failed_probes",
            "loss_first",
            "loss_last", "tokens_per_s", "wall_time_s")},
        "accounting_holds": bool(summary) and started == done + dropped and summary.get("steps") == done // per_step,
        "servers": {name: asdict(report) for name, report in swarm.reports().items()},
        "liar": json.loads(liar_report.read_text()) if liar_report.is_file() else None,
        "exit_codes": exit_codes,
    }


def _print(report: dict) -> None:
    print(f"soak: {report['steps_asked']} steps asked, hedge_quantile={report['hedge_quantile']}, probe_timeout_s="
          f"{report['probe_timeout_s']}, {report['liar_kind']} liar, freeze {report['freeze_s']:g} s")
    for phase in report["phases"]:
        rate = "-" if phase["steps_per_s"] is None else f"{phase['steps_per_s']:.2f}"
        print(f"  {phase['from']:>24} -> {phase['to']:<24} {phase['steps']:>5} steps {phase['seconds']:6.1f} s {rate:>6} steps/s")
    print("  trainer: " + ", ".join(f"{k} {v}" for k, v in report["trainer"].items()))
    print(f"  accounting holds: {report['accounting_holds']}; liar: {report['liar']}")
    for name, server in report["servers"].items():
        print(f"  {name}: stage {server['stage']}, epoch {server['epoch']}, rounds {server['averaging_rounds']}, "
              f"solo {server['solo_steps']}, state downloads {server['state_downloads']} (failed {server['failed_state_downloads']}), "
              f"duplicates {server['duplicate_requests']}, watchdog {server.get('watchdog_exit')}")
    print(f"  exit codes: {report['exit_codes']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--freeze-s", type=float, default=20.0)
    parser.add_argument("--hedge-quantile", type=float, default=None)
    parser.add_argument("--probe-timeout-s", type=float, default=None)
    parser.add_argument("--liar-kind", choices=sorted(LIARS), default="nan")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--liar", nargs=2, metavar=("BOOTSTRAP_INFO", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.liar:
        try:
            asyncio.run(_run_liar(args.liar_kind, Path(args.liar[0]), Path(args.liar[1])))
        except asyncio.CancelledError:
            pass
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    report = soak(args.steps, args.freeze_s, args.hedge_quantile, out, args.probe_timeout_s, args.liar_kind)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    _print(report)
    print(f"  written: {out / 'soak.json'}")


if __name__ == "__main__":
    main()
