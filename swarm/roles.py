"""The live roles: bootstrap (organizer), stage server and trainer, each one process.

Every role is the protocol from ``node0sim.protocol`` (``SwarmPeer``/``StageServer``,
``Trainer``) on a :class:`~swarm.runtime.LiveRuntime`; this module only starts the node, reads
the signed run configuration, logs, and shuts down cleanly on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import torch

from node0sim.assembly import (
    calls_per_caller,
    flops_per_sample,
    make_organizer,
    make_swarm_peer,
    make_trainer,
    method_bytes,
    server_report,
    summarize,
    trainer_totals,
)
from node0sim.config import RunConfig, SwarmConfig
from node0sim.experiment import evaluate, micro_batch_sources, model_config, stage_computes, vocabulary_size
from node0sim.metrics import RunRecorder, StepTracker
from node0sim.protocol.averaging import GroupAverager
from node0sim.protocol.messages import AVERAGING_METHODS, GET_STATE, STAGE_METHODS
from node0sim.protocol.progress import read_stage
from node0sim.protocol.stage_compute import StageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.state_transfer import StateRequest
from node0sim.protocol.swarm_peer import SwarmPeer
from node0sim.protocol.trainer import Trainer
from node0sim.runtime import RPCError
from node0sim.summary import ServerReport, ServerTotals, TrainerTotals
from swarm import admission, allreduce, bandwidth, reachability, run_config
from swarm.lifecycle import SwarmError, exit_hard_after, load_identity
from swarm.node import LiveNode, NodeSettings
from swarm.runtime import LiveRuntime

log = logging.getLogger("node0sim.swarm")

GOODBYE_TIMEOUT_S = 10.0
SHUTDOWN_DEADLINE_S = 60.0
"""How long a stopping peer may take (goodbye, DHT node and daemon stopped, the event loop's cleanup) before it stops its
daemon and exits with status 1. A goodbye is bounded by ``GOODBYE_TIMEOUT_S``; a clean stop takes 1-2 s here. One
SIGTERMed server hung 12 minutes in its shutdown with an idle event loop (cause not found, not reproduced in 3 tries)."""


def node_settings(swarm: SwarmConfig) -> NodeSettings:
    """Networking settings of this peer from ``swarm.*``."""
    return NodeSettings(
        host=swarm.host, port=swarm.host_port, announce_host=swarm.announce_host,
        announce_port=swarm.announce_port, initial_peers=tuple(swarm.initial_peers),
        identity_path=Path(swarm.identity_path), nat_traversal=swarm.nat_traversal,
        max_message_bytes=int(swarm.max_message_mb * 2**20), startup_timeout_s=swarm.startup_timeout_s,
        injected_latency_s=swarm.injected_latency_ms / 1000,
    )


def run_role(config: Mapping[str, Any], run: RunConfig, recorder_factory: Callable[[RunConfig, dict], RunRecorder]) -> Any:
    """Run this process's role until it ends (trainer) or is stopped (Ctrl-C / SIGTERM)."""
    role = run.swarm.role
    if role == "bootstrap":
        return _until_stopped(bootstrap(config, run))
    if role == "server":
        return _until_stopped(serve(config, run))
    if role == "trainer":
        return _until_stopped(train(config, run, recorder_factory))
    raise SwarmError(f"swarm.role={role} is not a single-process role")


def _until_stopped(main: Awaitable[Any], deadline_s: float = SHUTDOWN_DEADLINE_S) -> Any:
    """Run ``main``; SIGINT and SIGTERM cancel it, so its ``finally`` blocks shut the peer down. From the signal (or
    ``main``'s end, for the event loop's own cleanup) the process has ``deadline_s`` to finish, or it exits hard."""
    deadline: list[threading.Timer] = []

    def start_deadline() -> None:
        if not deadline:
            deadline.append(exit_hard_after(deadline_s))

    async def supervised() -> Any:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            start_deadline()
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            return await task
        except asyncio.CancelledError:
            log.info("Stopped")
            return None
        finally:
            start_deadline()  # asyncio.run then cancels leftover tasks and joins executor threads: bounded too

    try:
        return asyncio.run(supervised())
    finally:
        for timer in deadline:
            timer.cancel()


async def _joined_run(node: LiveNode, local: Mapping[str, Any], swarm: SwarmConfig, run_id: str) -> tuple[RunConfig, dict]:
    published = await run_config.fetch(node.dht, run_id, swarm.organizer_key, swarm.startup_timeout_s)
    node.runtime.spawn(run_config.keep_restoring(node.dht, run_id, swarm.organizer_key))  # outlives the organizer
    run, document = run_config.merge(published, local)
    node.runtime.request_idle_s = run.train.request_timeout_s
    node.runtime.max_calls_per_caller = calls_per_caller(run)
    if run.swarm.admission == "token":
        rule = admission.Admission(run_id, swarm.organizer_key)
        rt = node.runtime
        rt.admit(rule, admission.load_own_token(run.swarm.admission_token, rule, rt.peer_id, rt.now()))  # before joining
        rt.spawn(admission.keep_own_token(rt, rule, run.swarm.admission_token, run_config.REFRESH_S))
    log.info("Joined run %r (model %s, %d stages), configuration signed by %s", run.run_id,
             run.model.get("name"), run.topology.num_stages, swarm.organizer_key)
    return run, document


# ---- bootstrap -------------------------------------------------------------------------------
async def bootstrap(config: Mapping[str, Any], run: RunConfig) -> None:
    """Organizer: the first DHT peer; publishes the signed run configuration and keeps it fresh."""
    node = await LiveNode.start(node_settings(run.swarm))
    try:
        organizer = run_config.signer_fingerprint(node.signer.local_public_key)
        node.runtime.request_idle_s = run.train.request_timeout_s
        node.runtime.max_calls_per_caller = calls_per_caller(run)
        if run.swarm.admission == "token":
            rule = admission.Admission(run.run_id, organizer)
            key = load_identity(Path(run.swarm.identity_path))
            admission.admit_organizer(node.runtime, rule, key, run_config.REFRESH_S)
            node.runtime.spawn(admission.keep_organizer_token(node.runtime, rule, key, run_config.REFRESH_S))
        bandwidth.serve_probe(node.runtime)
        reachability.serve_dial_back(node.runtime)
        publisher = asyncio.create_task(run_config.keep_publishing(
            node.dht, node.signer, config, run.run_id, run.swarm.run_config_lifetime_h * 3600
        ))
        make_organizer(node.runtime, run).serve()  # topology.stage_assignment=central
        join = f"swarm.initial_peers=[{','.join(node.visible_maddrs)}] swarm.organizer_key={organizer} run_id={run.run_id}"
        print(f"Bootstrap peer {node.runtime.peer_id} of run {run.run_id!r} is up. Others join with:\n  {join}", flush=True)
        if run.swarm.info_path:
            info = {"maddrs": node.visible_maddrs, "organizer_key": organizer, "run_id": run.run_id,
                    "peer_id": node.runtime.peer_id}
            _write_json(Path(run.swarm.info_path), info)
        await publisher
    finally:
        await node.stop()


# ---- stage server ----------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SwarmError(f"swarm.device={name}: torch sees no CUDA device on this machine (use swarm.device=cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SwarmError(f"swarm.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def measured_flops(device: torch.device, repeats: int = 8) -> float:
    """Achieved FLOP/s of ``device`` on fp32 matrix products (what the balancing rule compares)."""
    size = 4096 if device.type == "cuda" else 512  # large enough to keep a GPU busy, quick on a CPU
    a = torch.randn(size, size, device=device)

    def run() -> None:
        for _ in range(repeats):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # warm-up: kernel selection, lazy initialization
    start = time.perf_counter()
    run()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


async def serve(local: Mapping[str, Any], swarm_run: RunConfig) -> None:
    """A stage server: picks its stage (``swarm.stage`` or the weakest), loads state, serves, averages."""
    node = await LiveNode.start(node_settings(swarm_run.swarm))
    member = None
    try:
        run, _ = await _joined_run(node, local, swarm_run.swarm, swarm_run.run_id)
        device = _device(run.swarm.device)
        templates = stage_computes(run, model_config(run, vocabulary_size(run)), str(device))
        throughput = measured_flops(device) / flops_per_sample(run, templates)
        rt = node.runtime
        bootstrap_peer = run.swarm.initial_peers[0].rsplit("/p2p/", 1)[1] if run.swarm.initial_peers else None
        if bootstrap_peer:
            await reachability.check_reachable(rt, bootstrap_peer, node.visible_maddrs, run.swarm.nat_traversal)
        up_mbps = await bandwidth.announced_uplink_mbps(rt, bootstrap_peer, run.network.up_mbps, run.swarm.bandwidth_probe_mb)
        run = replace(run, network=replace(run.network, up_mbps=up_mbps))

        averager = GroupAverager
        if run.swarm.all_reduce == "hivemind":
            await allreduce.install(rt)
            averager = allreduce.HivemindGroupAverager

        organizer = run.swarm.initial_peers[0].rsplit("/p2p/", 1)[-1] if run.swarm.initial_peers else None
        member = make_swarm_peer(rt, run, templates.__getitem__, throughput, averager, organizer)
        joining = rt.spawn(member.run(run.swarm.stage, load_state=True))
        await _report_while_serving(rt, member, run.swarm)  # returns when the watchdog (averaging.watchdog_*) exits it
        joining.cancel()
    finally:
        try:
            if member is not None and member.server is not None:
                await asyncio.wait_for(member.leave(), GOODBYE_TIMEOUT_S)
                if swarm_run.swarm.info_path:
                    _write_json(Path(swarm_run.swarm.info_path), asdict(exit_report(node.runtime, member.server)))
        finally:
            await node.stop()


async def _report_while_serving(rt: LiveRuntime, member: SwarmPeer, swarm: SwarmConfig) -> None:
    """Node0-style log lines: batches processed per period, every averaging round with its group size; returns when the
    watchdog made the server exit."""
    rounds, solo, failed, downloads, failed_downloads, stale_reads, processed, last_log = 0, 0, 0, 0, 0, 0, 0, time.monotonic()
    saved, failed_saves = 0, 0
    seen_peers = None
    serving = None
    while True:
        await asyncio.sleep(0.5)
        server = member.server
        if server is None:
            continue
        if server.exited:
            cause = f": {server.stats.checkpoint_error}" if server.stats.checkpoint_error else ""
            log.error("Watchdog: %s (stage %d)%s. Exiting run.", server.stats.watchdog_exit, server.stage, cause)
            return
        if server is not serving:
            serving = server
            layers = server.compute.layer_range
            log.info("Serving stage %d of %d (layers %d-%d%s)", server.stage, member.num_stages, layers.start, layers.stop - 1,
                     ", named by the organizer" if member.named_by_organizer and not member.moves else "")
            if server.stats.checkpoint_restores:
                log.info("Restored stage %d from its checkpoint %s (epoch %d): no peer of the stage sent its state", server.stage,
                         server.checkpoints.path(server.stage), server.epoch)
        if server.stats.state_downloads > downloads:
            downloads = server.stats.state_downloads
            log.info("Downloaded the stage state from a peer (stage %d, now at epoch %d)", server.stage, server.epoch)
        if server.stats.failed_state_downloads > failed_downloads:
            failed_downloads = server.stats.failed_state_downloads
            log.warning("State download failed (%d so far, stage %d): retrying with another peer", failed_downloads, server.stage)
        if server.stats.checkpoints_saved > saved:
            saved = server.stats.checkpoints_saved
            log.debug("Saved the checkpoint of stage %d at epoch %d (%d so far)", server.stage, server.epoch, saved)
        if server.stats.failed_checkpoints > failed_saves:
            failed_saves = server.stats.failed_checkpoints
            log.warning("Checkpoint not saved (%d failed so far), serving on: %s", failed_saves, server.stats.checkpoint_error)
        if len(server.progress.others()) != seen_peers:
            seen_peers = len(server.progress.others())
            log.info("Sees %d other ready peer(s) in stage %d", seen_peers, server.stage)
        if server.progress.stale_reads > stale_reads:
            stale_reads = server.progress.stale_reads
            log.warning("A DHT read of stage %d missed this peer's own record (a lagging DHT): kept the last view of the "
                        "stage (%d such reads so far)", server.stage, stale_reads)
        if server.stats.averaging_rounds > rounds:
            rounds = server.stats.averaging_rounds
            log.info("Averaged gradients with %d peers (stage %d, epoch %d)", server.stats.last_group_size, server.stage, server.epoch)
        if server.stats.solo_steps > solo:
            solo = server.stats.solo_steps
            log_solo_step(server)
        if server.stats.failed_rounds > failed:
            failed = server.stats.failed_rounds
            log.warning("All-reduce failed: a part missed its deadline, or nothing usable came back from the group (%d so far, "
                        "stage %d, epoch %d)", failed, server.stage, server.epoch)
        if time.monotonic() - last_log >= swarm.log_period_s:
            total = sum(rt.handled.get(m, 0) for m in STAGE_METHODS)
            log.info("Processed %d batches in last %g seconds (stage %d)", total - processed, swarm.log_period_s, server.stage)
            processed, last_log = total, time.monotonic()


def log_solo_step(server: StageServer) -> None:
    """A step without a group is a failure only when other ready peers were in the stage; alone, it is the plan."""
    others = len(server.progress.others())
    if others:
        log.info("Averaging step failed: could not find a group; stepped with local gradients (stage %d, epoch %d, "
                 "%d other ready peer(s) in the stage)", server.stage, server.epoch, others)
    else:
        log.debug("Stepped alone: no other ready peer in stage %d (epoch %d)", server.stage, server.epoch)


def exit_report(rt: LiveRuntime, server: StageServer) -> ServerReport:
    """A server's counters, written to ``swarm.info_path`` on exit (the local role sums them); averaging bytes
    include hivemind's all-reduce streams (``swarm.allreduce`` counts them under the same method names)."""
    return server_report(
        server, averaging_bytes=method_bytes(rt.sent_bytes, AVERAGING_METHODS),
        state_download_bytes=rt.response_bytes.get(GET_STATE, 0), handled=dict(rt.handled), sent_bytes=dict(rt.sent_bytes),
    )


# ---- trainer ---------------------------------------------------------------------------------
async def train(
    local: Mapping[str, Any], swarm_run: RunConfig, recorder_factory: Callable[[RunConfig, dict], RunRecorder]
) -> dict[str, Any]:
    """A trainer: streams its data shard through the swarm; writes metrics.jsonl and summary.json."""
    wall_start = time.perf_counter()
    node = await LiveNode.start(node_settings(swarm_run.swarm))
    try:
        run, document = await _joined_run(node, local, swarm_run.swarm, swarm_run.run_id)
        rt = node.runtime
        sources, validation, vocab_size = micro_batch_sources(run)
        index = run.swarm.trainer_index % len(sources)
        templates = stage_computes(run, model_config(run, vocab_size))
        recorder = recorder_factory(run, document)
        trainer: Trainer | None = None

        def totals() -> TrainerTotals:
            return trainer_totals([trainer.stats], rt.sent_bytes_total())

        tracker = StepTracker(run.train.micro_batches_per_step, recorder.log, lambda: asdict(totals()))
        started = rt.now()

        def on_micro_batch(record: dict[str, Any]) -> None:  # metrics count time from the trainer's start
            tracker({**record, "time_s": record["time_s"] - started})

        trainer = make_trainer(rt, run, templates, sources[index], index, on_micro_batch)
        try:
            await trainer.run()
        except BaseException:
            recorder.close(None)
            raise
        elapsed = rt.now() - started
        val_loss = evaluate(await _current_weights(rt, run, templates), validation) if validation else None
        stage_bytes = method_bytes(rt.sent_bytes, STAGE_METHODS) + method_bytes(rt.received_bytes, STAGE_METHODS)
        summary = summarize(  # server-side counters: None here; the local role fills them from the servers' reports
            run, backend="swarm", numerics=True, model=run.model.get("name"), churn="live", trainers=[trainer.stats],
            tracker=tracker, records=recorder.records, elapsed_s=elapsed, wall_s=time.perf_counter() - wall_start,
            val_loss=val_loss, stage_bytes=stage_bytes, totals=totals(), servers=ServerTotals(), time_origin_s=started,
        ).as_dict()
        summary["outputs"] = {k: str(v) for k, v in recorder.finish(summary).items()}
        return summary
    finally:
        await node.stop()


async def _current_weights(rt: LiveRuntime, run: RunConfig, templates: list[StageCompute]) -> list[StageCompute]:
    """The pipeline as the swarm holds it now: each stage's state fetched from one of its servers."""
    for stage, template in enumerate(templates):
        records = await read_stage(rt, run.run_id, stage)
        for peer in [p for p, r in records.items() if r.ready]:
            try:
                response = await rt.call(peer, GET_STATE, StateRequest(stage), run.averaging.state_timeout_s)
            except RPCError as error:
                log.warning("could not fetch stage %d from %s for validation: %s", stage, peer, error)
                continue
            template.import_state(response.state)
            break
        else:
            log.warning("no server of stage %d answered; validating with its initial weights", stage)
    return templates


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(content, indent=1))
    partial.replace(path)
