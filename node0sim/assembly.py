"""How either backend assembles a run from the protocol: stage servers, trainers, and the summary.

The simulator (``node0sim.sim.runner``) and the live swarm (``swarm.roles``) give these a runtime
and what only they know (a peer's FLOP/s, the bytes their network counted); everything else about a
run is decided here, once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from node0sim.config import RunConfig
from node0sim.metrics import StepTracker
from node0sim.protocol.averaging import AveragerFactory, GroupAverager
from node0sim.protocol.checkpoints import CheckpointStore
from node0sim.protocol.direct import DirectConfig
from node0sim.protocol.messages import TensorSpec
from node0sim.protocol.stage_compute import StageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.swarm_peer import BalanceConfig, StageOrganizer, SwarmPeer
from node0sim.protocol.trainer import MicroBatchSource, Trainer, TrainerConfig, TrainerStats, in_flight_window
from node0sim.runtime import Runtime
from node0sim.summary import RunSummary, ServerReport, ServerTotals, TrainerTotals, latency_quantiles, steady_throughput


def method_bytes(counter: Mapping[str, int], methods: Sequence[str]) -> int:
    """The bytes a per-method counter holds for ``methods``."""
    return sum(counter.get(m, 0) for m in methods)


def flops_per_sample(run: RunConfig, templates: Sequence[StageCompute]) -> float:
    """Mean FLOPs of one sample's forward and backward pass through a stage: a peer's throughput in samples/s
    (what the balancing rule compares) is its FLOP/s over this."""
    sample = TensorSpec((1, run.train.seq_len), torch.int64)
    return sum(c.forward_flops(sample) + c.backward_flops(sample) for c in templates) / len(templates)


def make_swarm_peer(
    rt: Runtime, run: RunConfig, compute_for: Callable[[int], StageCompute], throughput: float,
    averager: AveragerFactory = GroupAverager, organizer: str | None = None,
) -> SwarmPeer:
    """A server peer of the run: ``compute_for(stage)`` is the compute of the stage it serves (or moves to);
    ``averager`` builds its in-stage all-reduce (see :class:`StageServer`); ``organizer``: the peer that names a
    joiner's stage with ``topology.stage_assignment=central``."""

    train = run.train
    direct = DirectConfig(run.topology.num_stages, train.request_timeout_s, ban_s=train.ban_s, max_ban_s=train.max_ban_s) \
        if run.topology.pipeline == "direct" else None

    swarm = run.swarm
    checkpoints = CheckpointStore(Path(swarm.checkpoint_dir), run.run_id, swarm.checkpoint_every_epochs) if swarm.checkpoint_dir else None

    def make_server(stage: int) -> StageServer:
        return StageServer(
            rt, run.run_id, compute_for(stage), run.averaging, throughput=throughput, bandwidth_mbps=run.network.up_mbps,
            seed=run.seed, max_batch_requests=run.topology.max_batch_requests, averager=averager,
            delay_history=run.train.delay_history if run.sim.numerics or run.backend == "swarm" else 0,
            weight_stashing=run.topology.weight_stashing, direct=direct, max_abs_value=run.train.max_abs_value,
            checkpoints=checkpoints,
        )

    balance = BalanceConfig(run.topology.rebalance_period_s, run.topology.rebalance_margin)
    central = run.topology.stage_assignment == "central"
    return SwarmPeer(rt, run.run_id, run.topology.num_stages, throughput, make_server, balance, organizer if central else None)


def make_organizer(rt: Runtime, run: RunConfig) -> StageOrganizer:
    """The organizer that names joiners' stages (``topology.stage_assignment=central``). A joiner it assigned
    announces once it has loaded its stage's state, so it counts as pending for up to the state timeout."""
    return StageOrganizer(rt, run.run_id, run.topology.num_stages, pending_s=run.averaging.state_timeout_s)


def micro_batch_share(run: RunConfig, index: int) -> int:
    """Micro-batches trainer ``index`` pushes: the run's total split across ``topology.num_trainers`` (the
    first ones take one more when it does not divide)."""
    total = run.train.steps * run.train.micro_batches_per_step
    trainers = run.topology.num_trainers
    return total // trainers + (index < total % trainers)


def trainer_steps(run: RunConfig, index: int) -> int:
    """Steps trainer ``index`` completes on its own share (what its live recorder counts): the whole run's
    ``train.steps`` for a single trainer."""
    return micro_batch_share(run, index) // run.train.micro_batches_per_step


CALLS_BEYOND_PIPELINE = 16
"""Calls a peer may have open to another beyond pipeline requests: the protocol all-reduce's parts and results (up to
``MAX_EARLY_ROUNDS`` = 4 rounds at once), a state download, a stage assignment, the probes at join."""


def calls_per_caller(run: RunConfig) -> int:
    """The most calls an honest peer of ``run`` has open to one other peer at once, with a margin: twice the micro-batches
    all ``topology.num_trainers`` trainers may have in flight (each has at most one call at a given server; in the direct
    pipeline a server relays for every trainer; twice, as a call that timed out at its caller may still run at its
    server when the retry comes), plus :data:`CALLS_BEYOND_PIPELINE`."""
    schedule = TrainerConfig(micro_batches=1, micro_batches_per_step=run.train.micro_batches_per_step, schedule=run.train.schedule,
                             max_inflight=run.train.max_inflight, pipeline=run.topology.pipeline, direct_schedule=run.topology.schedule)
    window = in_flight_window(schedule, run.topology.num_stages, run.train.micro_batches_per_step)
    return 2 * run.topology.num_trainers * window + CALLS_BEYOND_PIPELINE


def make_trainer(
    rt: Runtime, run: RunConfig, templates: Sequence[StageCompute], source: MicroBatchSource, index: int,
    on_micro_batch: Callable[[dict[str, Any]], None],
) -> Trainer:
    """Trainer ``index`` of the run, pushing its share of the micro-batches from ``source``; ``templates`` (a compute of
    each stage) give the layouts of valid replies and the vocabulary its loss bound is ln of."""
    cfg = TrainerConfig(
        micro_batches=micro_batch_share(run, index), micro_batches_per_step=run.train.micro_batches_per_step,
        schedule=run.train.schedule, max_inflight=run.train.max_inflight,
        request_timeout_s=run.train.request_timeout_s, max_retries=run.train.max_retries, ban_s=run.train.ban_s,
        max_ban_s=run.train.max_ban_s, send_token_ids=templates[0].codec.needs_token_ids, tail_calls=run.topology.tail_calls,
        pipeline=run.topology.pipeline, direct_schedule=run.topology.schedule, max_abs_value=run.train.max_abs_value,
        max_loss=run.train.max_loss_ratio * math.log(templates[-1].cfg.vocab_size), hedge_quantile=run.train.hedge_quantile,
        probe_timeout_s=run.train.probe_timeout_s,
    )
    return Trainer(rt, run.run_id, len(templates), source, cfg, on_micro_batch, layouts=templates)


def trainer_totals(trainers: Sequence[TrainerStats], bytes_sent: int) -> TrainerTotals:
    """The run-wide trainer counters of ``trainers``; ``bytes_sent`` as the backend counts it."""
    def total(name: str) -> int:
        return sum(getattr(t, name) for t in trainers)

    return TrainerTotals(
        failed_requests=total("failed_requests"), retried_requests=total("retried_requests"),
        dropped_micro_batches=total("micro_batches_dropped"), timed_out_requests=total("timed_out_requests"),
        no_peer_requests=total("no_peer_requests"), unaccumulated_retries=total("unaccumulated_retries"), bytes_sent=bytes_sent,
        invalid_replies=total("invalid_replies"), refused_requests=total("refused_requests"), lost_requests=total("lost_requests"),
        hedged_requests=total("hedged_requests"), hedges_won=total("hedges_won"), failed_probes=total("failed_probes"),
    )


def server_report(server: StageServer, averaging_bytes: int | None = None, state_download_bytes: int | None = None,
                  handled: dict[str, int] | None = None, sent_bytes: dict[str, int] | None = None) -> ServerReport:
    """``server``'s counters now; the byte counts as its backend measured them (per server, if at all)."""
    stats = server.stats
    return ServerReport(
        peer_id=server.rt.peer_id, stage=server.stage, epoch=server.epoch, samples=stats.samples,
        averaging_rounds=stats.averaging_rounds, solo_steps=stats.solo_steps,
        state_averaging_rounds=stats.state_averaging_rounds, state_downloads=stats.state_downloads,
        failed_state_downloads=stats.failed_state_downloads, averaging_timeouts=server.averager.timeouts,
        request_calls=stats.request_calls, batched_requests=stats.batched_requests,
        duplicate_requests=server.requests.duplicates, averaging_bytes=averaging_bytes,
        state_download_bytes=state_download_bytes, handled=handled, sent_bytes=sent_bytes,
        delay_counts=list(stats.staleness.delay_counts), weight_gap_sum=stats.staleness.weight_gap_sum,
        weight_gap_count=stats.staleness.weight_gap_count, lookahead_cosine_sum=stats.staleness.lookahead_cosine_sum,
        lookahead_cosine_count=stats.staleness.lookahead_cosine_count, watchdog_exit=stats.watchdog_exit,
        failed_rounds=stats.failed_rounds, refused_values=stats.refused_values,
        declined_state_downloads=stats.declined_state_downloads, checkpoints_saved=stats.checkpoints_saved,
        checkpoint_restores=stats.checkpoint_restores, failed_checkpoints=stats.failed_checkpoints,
    )


def summarize(
    run: RunConfig, *, backend: str, numerics: bool, model: str | None, churn: str, trainers: Sequence[TrainerStats],
    tracker: StepTracker, records: list[dict[str, Any]], elapsed_s: float, wall_s: float, val_loss: float | None,
    stage_bytes: int, totals: TrainerTotals, servers: ServerTotals, churn_events: dict[str, int] | None = None,
    stage_moves: int | None = None, gpu_utilization: dict[str, float] | None = None, time_origin_s: float = 0.0,
    dense_activation_bytes_per_token: float | None = None,
) -> RunSummary:
    """The run's summary from its trainers' counters and step records over ``elapsed_s``; ``stage_bytes``: bytes of
    ``STAGE_METHODS`` traffic; churn events, stage moves, GPU utilization and the dense activation bytes only the
    simulator measures. ``time_origin_s``: where the records' clock starts on the trainers' runtime clock."""
    done = sum(t.micro_batches_done for t in trainers)
    last_starts = [t.last_start_s for t in trainers if t.last_start_s is not None]
    drain_start_s = min(last_starts) - time_origin_s if last_starts else None
    fill_tokens = 2 * sum(t.peak_in_flight for t in trainers) * run.train.micro_batch_size * run.train.seq_len
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    return RunSummary(
        backend=backend, numerics=numerics, model=model, seed=run.seed, num_stages=run.topology.num_stages,
        num_trainers=run.topology.num_trainers, schedule=run.train.schedule, compression=run.compression.name,
        compression_rate=run.compression.rate, churn=churn, steps=done // run.train.micro_batches_per_step,
        samples=tracker.samples, tokens=tracker.tokens, sim_time_s=elapsed_s, wall_time_s=wall_s,
        tokens_per_s=tracker.tokens / elapsed_s if elapsed_s > 0 else 0.0,
        tokens_per_s_steady=steady_throughput(records, drain_start_s, fill_tokens),
        loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None, val_loss=val_loss,
        activation_bytes_per_token=stage_bytes / tracker.tokens if tracker.tokens else None,
        micro_batches_started=sum(t.micro_batches_started for t in trainers), micro_batches_done=done,
        micro_batches_in_flight=sum(t.micro_batches_in_flight for t in trainers),
        rpc_bytes_per_stage=[sum(t.stage_bytes.get(i, 0) for t in trainers) for i in range(run.topology.num_stages)],
        trainer_totals=totals, servers=servers, churn_events=churn_events, stage_moves=stage_moves,
        gpu_utilization=gpu_utilization, dense_activation_bytes_per_token=dense_activation_bytes_per_token,
        request_latency_s=latency_quantiles(_merged(t.request_seconds for t in trainers)),
    )


def _merged(per_trainer: Iterable[dict[str, list[float]]]) -> dict[str, list[float]]:
    merged: dict[str, list[float]] = {}
    for seconds in per_trainer:
        for method, values in seconds.items():
            merged.setdefault(method, []).extend(values)
    return merged
