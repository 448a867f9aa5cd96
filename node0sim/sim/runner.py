"""Run one experiment on the SimPy backend: build the virtual swarm, train, summarize."""

from __future__ import annotations

import copy
import dataclasses
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Generator

import simpy
import torch

from node0sim.assembly import (
    flops_per_sample,
    make_organizer,
    make_swarm_peer,
    make_trainer,
    method_bytes,
    server_report,
    summarize,
    trainer_totals,
)
from node0sim.config import CompressionConfig, ConfigError, RunConfig, SimConfig
from node0sim.experiment import evaluate, micro_batch_sources, model_config, stage_computes
from node0sim.metrics import RunRecorder, StepTracker
from node0sim.model import ModelConfig
from node0sim.model.costs import StageMemory, hidden_bytes, stage_memory, stage_shapes
from node0sim.protocol.messages import AVERAGING_METHODS, GET_STATE, STAGE_METHODS
from node0sim.protocol.optimizers import STATE_LAYOUTS
from node0sim.protocol.stage_compute import StageCompute, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.swarm_peer import StageOrganizer, SwarmPeer
from node0sim.protocol.trainer import Trainer
from node0sim.sim.churn import ACTIONS, ChurnConfig, churn_schedule
from node0sim.sim.engine import SimPeer, Simulation
from node0sim.sim.gpus import ELEMENT_BYTES, compute_model, gpu_profile
from node0sim.sim.network import TcpModel
from node0sim.sim.regions import region_preset
from node0sim.summary import RunSummary, ServerTotals, TrainerTotals, staleness_record

DEFAULT_CHURN_HORIZON_S = 24 * 3600.0
ORGANIZER = "organizer"
"""Peer id of the virtual organizer (central stage assignment)."""


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
        link_sharing=run.sim.link_sharing,
        transport=transport_model(run.sim),
        rpc_overhead_s=run.sim.tcp_rpc_overhead_ms / 1000 if run.sim.transport == "tcp" else 0.0,
        pair_streams=run.sim.pair_streams,
    )


def stage_memories(run: RunConfig, cfg: ModelConfig) -> list[StageMemory]:
    """Peak memory of a server of each stage (:func:`node0sim.model.costs.stage_memory`). Every micro-batch in flight
    (``num_trainers x max_inflight``, or a sync step's) may wait at one stage, holding what its request carries: an
    activation or gradient of ``hidden_bytes / compression.rate`` (rate 1 without compression) in the wire dtype
    (timing mode: ``sim.timing_dtype``; numerics: fp32), two for a body stage's backward (input and output gradient),
    one for the head's (output gradient) and the tail's (input); token ids and headers are left out."""
    train = run.train
    in_flight = run.topology.num_trainers * train.max_inflight if train.schedule == "async" else train.micro_batches_per_step
    wire_element_bytes = getattr(torch, run.sim.timing_dtype).itemsize if not run.sim.numerics else 4
    rate = run.compression.rate if run.compression.name != "none" else 1.0
    wire = hidden_bytes(cfg, train.micro_batch_size, train.seq_len, wire_element_bytes) / rate
    return [
        stage_memory(
            cfg, layers, is_head, is_tail, micro_batch=train.micro_batch_size, seq_len=train.seq_len,
            element_bytes=ELEMENT_BYTES[run.sim.compute_dtype], requests_per_call=run.topology.max_batch_requests,
            queued_bytes=in_flight * wire * (1 if is_head or is_tail else 2),
            state_tensors=len(STATE_LAYOUTS[run.optim.name].tensors),
        )
        for layers, is_head, is_tail in stage_shapes(cfg, run.topology.num_stages)
    ]


def check_memory(run: RunConfig, cfg: ModelConfig) -> None:
    """Refuse, before anything runs, a run with a stage that does not fit in the smallest GPU that may serve it
    (``sim.gpu``, or those of ``sim.gpu_mix`` and ``churn.gpu_mix``), naming what takes the memory."""
    names = [name for mix in (run.sim.gpu_mix, run.churn.gpu_mix) for name, weight in mix.items() if weight > 0]
    gpu = min((gpu_profile(name) for name in names or [run.sim.gpu]), key=lambda g: g.memory_gb)
    memories = stage_memories(run, cfg)
    too_big = [i for i, memory in enumerate(memories) if memory.total > gpu.memory_gb * 1e9]
    if not too_big:
        return
    worst = max(too_big, key=lambda i: memories[i].total)
    m, train = memories[worst], run.train

    def gb(value: float) -> str:
        return f"{value / 1e9:.1f} GB"

    raise ConfigError(
        f"sim.check_memory: {len(too_big)} of {len(memories)} stages do not fit on {gpu.name} ({gpu.memory_gb:g} GB); "
        f"stage {worst} needs {gb(m.total)}: weights {gb(m.weights)}, gradients {gb(m.gradients)}, optimizer state "
        f"{gb(m.optimizer_state)}, activations of one call ({run.topology.max_batch_requests} x {train.micro_batch_size} "
        f"x {train.seq_len} tokens, {run.sim.compute_dtype}) {gb(m.activations)}, the requests that may wait for it "
        f"{gb(m.queued_requests)}. Use a larger GPU, smaller micro-batches or more stages, or "
        f"sim.check_memory=false to run anyway"
    )


def transport_model(sim: SimConfig) -> TcpModel | None:
    """The transport model ``sim.transport`` selects (None: the fluid model alone)."""
    if sim.transport == "fluid":
        return None
    return TcpModel(window_bytes=sim.tcp_window_kib * 1024, message_overhead_bytes=sim.tcp_message_overhead_bytes,
                    byte_overhead=sim.tcp_byte_overhead, slow_start_after_idle=sim.tcp_slow_start_after_idle,
                    path_rtt_s=None if sim.tcp_rtt_ms is None else sim.tcp_rtt_ms / 1000,
                    software_bytes_per_s=sim.tcp_software_mb_per_s * 1e6)


class VirtualSwarm:
    """The stage servers of a simulated run: initial peers, joiners and departures (each one passed to ``log`` as a
    ``{"event": "churn"}`` record)."""

    def __init__(self, run: RunConfig, sim: Simulation, templates: list[StageCompute], log: Callable[[dict[str, Any]], None]):
        self.run = run
        self.log = log
        self.sim = sim
        self.templates = templates
        self.regions = region_preset(run.network.regions).regions if run.network.latency_ms is None else ("local",)
        self.gpu_rng = random.Random(run.seed + 17)
        self.members: dict[str, tuple[SimPeer, SwarmPeer]] = {}
        self.departed: list[SwarmPeer] = []
        self.events = {action: 0 for action in ACTIONS}
        self.flops_per_sample = flops_per_sample(run, templates)
        self.organizer: StageOrganizer | None = None
        """The virtual organizer peer that names joiners' stages (``topology.stage_assignment=central``)."""
        if run.topology.stage_assignment == "central":
            self.organizer = make_organizer(self.add_peer(ORGANIZER, 0, None).runtime, run)
            self.organizer.serve()

    def add_peer(self, peer_id: str, index: int, gpu_name: str | None) -> SimPeer:
        """A peer on the network with this run's links and a GPU from the mix."""
        mix = self.run.sim.gpu_mix
        name = gpu_name or (self.gpu_rng.choices(sorted(mix), [mix[k] for k in sorted(mix)])[0] if mix else self.run.sim.gpu)
        sim_cfg, gpu = self.run.sim, gpu_profile(name)
        return self.sim.add_peer(
            peer_id, region=self.regions[index % len(self.regions)], up_mbps=self.run.network.up_mbps,
            down_mbps=self.run.network.down_mbps, gpu=gpu, call_overhead_s=sim_cfg.call_overhead_ms / 1000,
            compute_model=compute_model(sim_cfg.compute_model, gpu, sim_cfg.compute_dtype, sim_cfg.utilization),
        )

    def _compute_for(self, stage: int) -> StageCompute:
        template = self.templates[stage]
        if isinstance(template, TensorStageCompute):
            return TensorStageCompute(
                copy.deepcopy(template.module), template.optim, template.codec, template.basis,
                project_gradients=template.project_gradients,
            )
        return copy.copy(template)

    def launch(self, peer_id: str, stage: int | None, gpu_name: str | None = None, load_state: bool = True) -> None:
        """Start a server peer (at ``stage``, or wherever the balancing rule puts it)."""
        peer = self.add_peer(peer_id, len(self.members), gpu_name)
        member = make_swarm_peer(peer.runtime, self.run, self._compute_for, peer.flops_per_s / self.flops_per_sample,
                                 organizer=ORGANIZER)
        self.members[peer_id] = (peer, member)
        peer.runtime.spawn(member.run(stage, load_state))

    def churn(self, horizon_s: float) -> Generator[simpy.Event, None, None]:
        """SimPy process replaying the churn schedule."""
        schedule = churn_schedule(self.run.churn, sorted(self.members), horizon_s, random.Random(self.run.seed + 29))
        for event in schedule:
            yield self.sim.env.timeout(max(0.0, event.time - self.sim.env.now))
            if event.action == "join":
                self.events["join"] += 1
                self.launch(event.peer, None, event.gpu)
                self._log_churn(event.action, event.peer, None)
                continue
            if event.peer not in self.members:
                continue
            peer, member = self.members.pop(event.peer)
            self.departed.append(member)
            self.events[event.action] += 1
            self._log_churn(event.action, event.peer, member.stage)
            if event.action in ("crash", "kill"):
                peer.crash(reset_connections=event.action == "kill")
            else:
                goodbye = self.sim.start(peer, member.leave())
                goodbye.callbacks.append(lambda _event, peer=peer: peer.crash())

    def _log_churn(self, action: str, peer: str, stage: int | None) -> None:
        self.log({"event": "churn", "time_s": self.sim.env.now, "action": action, "peer": peer, "stage": stage,
                  "peers": len(self.members)})

    def snapshot(self) -> dict[str, Any]:
        """Peers per stage and averaging progress right now."""
        per_stage = [0] * len(self.templates)
        for _, member in self.members.values():
            if member.stage is not None:
                per_stage[member.stage] += 1
        servers = self.servers()
        return {
            "event": "swarm", "time_s": self.sim.env.now, "peers_per_stage": per_stage, "peers": len(self.members),
            "averaging_rounds": sum(s.stats.averaging_rounds for s in servers),
            "state_downloads": sum(s.stats.state_downloads for s in servers),
            "max_epoch_per_stage": [max((s.epoch for s in servers if s.stage == i), default=0) for i in range(len(per_stage))],
        }

    def servers(self) -> list[StageServer]:
        """Every server that ever ran (current and departed peers)."""
        return [m.server for _, m in self.members.values() if m.server] + [m.server for m in self.departed if m.server]


class SimulatedRun:
    """One run on the simulator: ``sim``, ``swarm`` and ``trainers`` can be inspected (or given extra
    events) before :meth:`execute` trains and summarizes."""

    def __init__(self, run: RunConfig, out_dir: Path, recorder: RunRecorder | None = None):
        self.wall_start = time.perf_counter()
        self.run = run
        self.recorder = recorder or RunRecorder(out_dir, run.train.steps)
        sources, self.validation, vocab_size = micro_batch_sources(run)
        self.model_cfg = model_config(run, vocab_size)
        if run.sim.check_memory:
            check_memory(run, self.model_cfg)
        self.templates = stage_computes(run, self.model_cfg)
        self.sim = build_simulation(run)
        self.swarm = VirtualSwarm(run, self.sim, self.templates, self.recorder.log)
        for stage in range(len(self.templates)):
            for k in range(run.topology.peers_per_stage):
                self.swarm.launch(f"s{stage}p{k}", stage, load_state=False)
        self.trainers: list[Trainer] = []
        self.tracker = StepTracker(run.train.micro_batches_per_step, self.recorder.log, lambda: asdict(self.totals()))
        self.tasks = []
        for index, source in enumerate(sources):
            peer = self.swarm.add_peer(f"trainer{index}", index, None)
            trainer = make_trainer(peer.runtime, run, self.templates, source, index, self.tracker)
            self.trainers.append(trainer)
            self.tasks.append(peer.runtime.spawn(trainer.run()).process)

    def totals(self) -> TrainerTotals:
        """Run-wide trainer counters, added to every step record."""
        return trainer_totals([t.stats for t in self.trainers], self.sim.network.bytes_sent)

    def execute(self) -> dict[str, Any]:
        """Train until every trainer is done (or ``train.max_sim_time_s``); write outputs; return the summary."""
        run, sim, swarm = self.run, self.sim, self.swarm
        sim.env.process(swarm.churn(run.train.max_sim_time_s or DEFAULT_CHURN_HORIZON_S))
        sim.env.process(_snapshots(sim, swarm, self.recorder, run.sim.snapshot_period_s))
        stop = self.trainers_done()
        if run.train.max_sim_time_s is not None:
            stop = sim.env.any_of([stop, sim.env.timeout(run.train.max_sim_time_s)])
        sim.run(until=stop)
        final = swarm.snapshot()
        if final != _last_snapshot(self.recorder.records):  # the periodic one may have been taken at this instant
            self.recorder.log(final)
        summary = self.summary().as_dict()
        self.recorder.log(staleness_record(summary))
        summary["outputs"] = {k: str(v) for k, v in self.recorder.finish(summary).items()}
        return summary

    def trainers_done(self) -> simpy.Event:
        """The event of every trainer having pushed all its micro-batches."""
        return self.sim.env.all_of(self.tasks)

    def summary(self) -> RunSummary:
        """The run's ``summary.json`` content."""
        run, sim, swarm = self.run, self.sim, self.swarm
        stats = [t.stats for t in self.trainers]
        sim_time = sim.env.now
        peers_per_stage = swarm.snapshot()["peers_per_stage"]
        servers = ServerTotals.of(
            [server_report(s) for s in swarm.servers()], run.topology.peers_per_stage * len(self.templates), peers_per_stage,
            averaging_bytes=method_bytes(sim.traffic, AVERAGING_METHODS), state_download_bytes=sim.traffic.get(GET_STATE, 0),
        )
        return summarize(
            run, backend="sim", numerics=run.sim.numerics, model=self.model_cfg.name, churn=run.churn.name, trainers=stats,
            tracker=self.tracker, records=self.recorder.records, elapsed_s=sim_time, wall_s=time.perf_counter() - self.wall_start,
            val_loss=evaluate(_replica(swarm, self.templates), self.validation),
            stage_bytes=method_bytes(sim.traffic, STAGE_METHODS), totals=self.totals(), servers=servers,
            churn_events={**swarm.events, "watchdog_exit": sum(servers.watchdog_exits.values())},
            stage_moves=sum(m.moves for _, m in swarm.members.values()) + sum(m.moves for m in swarm.departed),
            gpu_utilization={p.peer_id: round(p.busy_s / sim_time, 4) if sim_time else 0.0 for p in sim.peers.values()},
            dense_activation_bytes_per_token=dense_activation_bytes_per_token(run) if run.compression.name != "none" else None,
        )


def run_simulation(run: RunConfig, out_dir: Path, recorder: RunRecorder | None = None) -> dict[str, Any]:
    """Train ``run`` in virtual time; write metrics, summary and plots into ``out_dir``; return the summary."""
    return SimulatedRun(run, out_dir, recorder).execute()


def dense_activation_bytes_per_token(run: RunConfig) -> float:
    """Activation bytes per token the same pipeline sends with ``compression=none``, measured: one micro-batch of a
    dense twin (the same model, sequence and micro-batch sizes, numerics or timing mode; one peer per stage, one
    trainer, no churn) through the same trainer and messages. Message sizes depend only on those shapes, so the twin's
    bytes per token are the run's own without compression. One micro-batch, not one of the run's steps: a Node0-size
    step (1024 dense micro-batches from one trainer) would neither fit the memory check nor finish within the
    request timeout on slow links."""
    twin = dataclasses.replace(
        run, compression=CompressionConfig(seed=run.compression.seed), churn=ChurnConfig(name="none"),
        topology=dataclasses.replace(run.topology, peers_per_stage=1, num_trainers=1, rebalance_period_s=0.0),
        train=dataclasses.replace(
            run.train, steps=1, batch_size=run.train.micro_batch_size, schedule="sync", max_sim_time_s=None, eval_batches=0,
            probe_timeout_s=None,  # probes send no stage bytes; a timeout that fails them all would never let it start
        ),
    )
    with tempfile.TemporaryDirectory() as out:
        measured = SimulatedRun(twin, Path(out), RunRecorder(Path(out), 1, stream=None))
        measured.sim.run(until=measured.trainers_done())
    return method_bytes(measured.sim.traffic, STAGE_METHODS) / measured.tracker.tokens


def _replica(swarm: VirtualSwarm, templates: list[StageCompute]) -> list[StageCompute]:
    """One live server's weights per stage (the first alive peer), for validation."""
    replica = []
    for stage, template in enumerate(templates):
        live = [m.server.compute for _, m in swarm.members.values() if m.server and m.server.stage == stage]
        replica.append(live[0] if live else template)
    return replica


def _last_snapshot(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in reversed(records) if r.get("event") == "swarm"), None)


def _snapshots(sim: Simulation, swarm: VirtualSwarm, recorder: RunRecorder, period_s: float) -> Generator:
    while True:
        yield sim.env.timeout(period_s)
        recorder.log(swarm.snapshot())
