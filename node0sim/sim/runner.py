"""Run one experiment on the SimPy backend: build the virtual swarm, train, summarize."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from node0sim.config import RunConfig
from node0sim.experiment import evaluate, micro_batch_sources, model_config, stage_computes
from node0sim.metrics import RunRecorder, StepTracker
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.trainer import Trainer, TrainerConfig
from node0sim.sim.engine import Simulation
from node0sim.sim.gpus import gpu_profile
from node0sim.sim.regions import region_preset

STAGE_METHODS = ("forward", "backward", "tail")


def build_simulation(run: RunConfig) -> Simulation:
    """A simulation whose latency follows ``network.latency_ms`` or the region preset."""
    net = run.network
    if net.latency_ms is not None:
        uniform = net.latency_ms / 1000

        def latency_s(a: str, b: str) -> float:
            return uniform
    else:
        preset = region_preset(net.regions)

        def latency_s(a: str, b: str) -> float:
            return preset.latency_ms(a, b) / 1000

    return Simulation(
        seed=run.seed,
        latency_s=latency_s,
        jitter_s=net.jitter_ms / 1000,
        dht_latency_s=run.sim.dht_latency_ms / 1000,
        max_message_bytes=int(run.sim.max_message_mb * 2**20),
    )


def steady_throughput(records: list[dict[str, Any]]) -> float | None:
    """Tokens per second over the second half of the logged steps (excludes pipeline fill)."""
    if len(records) < 2:
        return None
    mid, last = records[(len(records) - 1) // 2], records[-1]
    elapsed = last["time_s"] - mid["time_s"]
    return (last["tokens"] - mid["tokens"]) / elapsed if elapsed > 0 else None


def run_simulation(run: RunConfig, out_dir: Path, recorder: RunRecorder | None = None) -> dict[str, Any]:
    """Train ``run`` in virtual time; write metrics, summary and plot into ``out_dir``; return the summary."""
    wall_start = time.perf_counter()
    recorder = recorder or RunRecorder(out_dir, run.train.steps)
    sources, validation, vocab_size = micro_batch_sources(run)
    cfg = model_config(run, vocab_size)
    computes = stage_computes(run, cfg)
    sim = build_simulation(run)
    regions = region_preset(run.network.regions).regions if run.network.latency_ms is None else ("local",)
    gpu = gpu_profile(run.sim.gpu)

    def add_peer(peer_id: str, index: int):
        return sim.add_peer(
            peer_id, region=regions[index % len(regions)], up_mbps=run.network.up_mbps,
            down_mbps=run.network.down_mbps, gpu=gpu, utilization=run.sim.utilization,
        )

    servers = []
    for index, compute in enumerate(computes):
        peer = add_peer(f"stage{index}-peer0", index)
        server = StageServer(peer.runtime, run.run_id, compute, update_every_samples=run.train.batch_size)
        peer.runtime.spawn(server.start())
        servers.append(server)

    trainers: list[Trainer] = []

    def totals() -> dict[str, int]:
        return {
            "failed_requests": sum(t.stats.failed_requests for t in trainers),
            "retried_requests": sum(t.stats.retried_requests for t in trainers),
            "dropped_micro_batches": sum(t.stats.micro_batches_dropped for t in trainers),
            "bytes_sent": sim.network.bytes_sent,
        }

    tracker = StepTracker(run.train.micro_batches_per_step, recorder.log, totals)
    total_micro_batches = run.train.steps * run.train.micro_batches_per_step
    tasks = []
    for index, source in enumerate(sources):
        share = total_micro_batches // len(sources) + (index < total_micro_batches % len(sources))
        trainer_cfg = TrainerConfig(
            micro_batches=share, micro_batches_per_step=run.train.micro_batches_per_step,
            schedule=run.train.schedule, max_inflight=run.train.max_inflight,
            request_timeout_s=run.train.request_timeout_s, max_retries=run.train.max_retries,
            send_token_ids=computes[0].codec.needs_token_ids,
        )
        peer = add_peer(f"trainer{index}", index)
        trainer = Trainer(peer.runtime, run.run_id, len(computes), source, trainer_cfg, tracker)
        trainers.append(trainer)
        tasks.append(peer.runtime.spawn(trainer.run()).process)

    stop = sim.env.all_of(tasks)
    if run.train.max_sim_time_s is not None:
        stop = sim.env.any_of([stop, sim.env.timeout(run.train.max_sim_time_s)])
    sim.run(until=stop)

    sim_time = sim.env.now
    step_losses = [r["loss"] for r in recorder.records if r.get("loss") is not None]
    done = sum(t.stats.micro_batches_done for t in trainers)
    activation_bytes = sum(sim.traffic.get(m, 0) for m in STAGE_METHODS)
    counters = totals()
    summary = {
        "backend": "sim",
        "numerics": run.sim.numerics,
        "model": cfg.name,
        "seed": run.seed,
        "num_stages": len(computes),
        "num_peers": len(servers),
        "num_trainers": len(trainers),
        "schedule": run.train.schedule,
        "compression": run.compression.name,
        "compression_rate": run.compression.rate,
        "steps": done // run.train.micro_batches_per_step,
        "samples": tracker.samples,
        "tokens": tracker.tokens,
        "sim_time_s": sim_time,
        "wall_time_s": time.perf_counter() - wall_start,
        "tokens_per_s": tracker.tokens / sim_time if sim_time > 0 else 0.0,
        "tokens_per_s_steady": steady_throughput(recorder.records),
        "loss_first": step_losses[0] if step_losses else None,
        "loss_last": step_losses[-1] if step_losses else None,
        "val_loss": evaluate(computes, validation),
        "activation_bytes_per_token": activation_bytes / tracker.tokens if tracker.tokens else None,
        **counters,
        "rpc_bytes_per_stage": [sum(t.stats.stage_bytes.get(i, 0) for t in trainers) for i in range(len(computes))],
        "optimizer_updates": [c.updates for c in computes],
        "gpu_utilization": {p.peer_id: round(p.busy_s / sim_time, 4) if sim_time else 0.0 for p in sim.peers.values()},
    }
    summary["outputs"] = {k: str(v) for k, v in recorder.finish(summary).items()}
    return summary
