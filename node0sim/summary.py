"""What a run reports, on either backend: ``summary.json`` (:class:`RunSummary`) and the exit report of
a live stage server (:class:`ServerReport`).

Every key of ``summary.json`` is a field here, so the simulator's and the live swarm's summaries have the
same keys (``SUMMARY_KEYS``). ``None``: not measured by this backend, or not known to the process that
wrote the summary (a live trainer knows nothing of the servers' counters; the local role adds them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Sequence, get_type_hints

from node0sim.protocol.stage_server import WATCHDOG_REASONS
from node0sim.protocol.staleness import mean_delay


@dataclass(frozen=True)
class TrainerTotals:
    """Run-wide trainer counters: in the summary and in every step record of ``metrics.jsonl``."""

    failed_requests: int
    retried_requests: int
    dropped_micro_batches: int
    timed_out_requests: int
    """Failed requests that got no answer within ``train.request_timeout_s``."""
    no_peer_requests: int
    """Failed attempts that found no available peer of the stage (none announced, or all banned)."""
    unaccumulated_retries: int
    """Backward/tail requests retried for the input gradient only after an attempt got no answer (timed out or lost
    mid-call: that peer may have accumulated it): each stage accumulates a micro-batch at most once."""
    bytes_sent: int
    """Message bytes sent: by every peer (simulator), by this trainer (live)."""
    invalid_replies: int = 0
    """Replies refused by the trainer (class, layout, values, loss): each counted as the replying peer's failure."""
    refused_requests: int = 0
    """Failed requests the peer refused (a ``RemoteError``)."""
    lost_requests: int = 0
    """Failed requests whose connection failed before the reply (relayed: failed = timed out + no peer + invalid +
    refused + lost)."""
    hedged_requests: int = 0
    """Requests also sent to a second replica after the hedge deadline (``train.hedge_quantile``)."""
    hedges_won: int = 0
    """Hedged requests answered first by the second replica."""
    failed_probes: int = 0
    """Probes of newly listed peers that got no valid answer (``train.probe_timeout_s``): those peers got no work."""


@dataclass(frozen=True)
class ServerReport:
    """One stage server's counters: the simulator sums them into the summary; a live server writes its own
    to ``swarm.info_path`` when it stops, and the local role sums those."""

    peer_id: str
    stage: int
    epoch: int
    samples: int
    averaging_rounds: int
    solo_steps: int
    state_averaging_rounds: int
    state_downloads: int
    failed_state_downloads: int
    averaging_timeouts: int
    request_calls: int
    batched_requests: int
    duplicate_requests: int = 0
    """Backward and tail requests that arrived again (a trainer's retry) and were not accumulated a second time."""
    averaging_bytes: int | None = None
    """Bytes this server sent for in-stage all-reduces (None on the simulator, which counts them network-wide)."""
    state_download_bytes: int | None = None
    """Bytes of stage state this server downloaded (None on the simulator, as above)."""
    handled: dict[str, int] | None = None
    """Requests this server answered, per method (live)."""
    sent_bytes: dict[str, int] | None = None
    """Message bytes this server sent, per method (live)."""
    delay_counts: list[int] | None = None
    """Backwards served by delay (``[tau]``: epochs between the forward and its backward; tail calls count as 0)."""
    weight_gap_sum: float = 0.0
    """Sum over the backwards whose forward's weights were kept (``train.delay_history``) of ``|w_t - w_{t-tau}|``."""
    weight_gap_count: int = 0
    lookahead_cosine_sum: float = 0.0
    """Sum of cos(w_t - w_{t-1}, w_t - w_{t-tau}) over those backwards with a nonzero gap and a known last update."""
    lookahead_cosine_count: int = 0
    watchdog_exit: str | None = None
    """Why the watchdog made this server exit (``averaging.watchdog_*``); None: it did not."""
    failed_rounds: int = 0
    """All-reduces (gradient or state) that gave no usable mean with another member."""
    refused_values: int = 0
    """Requests refused for a non-finite or too large activation or gradient (``train.max_abs_value``)."""
    declined_state_downloads: int = 0
    """State requests declined by a donor serving another download (the next donor was tried)."""
    checkpoints_saved: int = 0
    checkpoint_restores: int = 0
    failed_checkpoints: int = 0
    """Checkpoint saves that failed (``swarm.checkpoint_dir``; the server served on)."""

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> ServerReport:
        """The report as read back from its JSON (unknown keys are ignored)."""
        return cls(**{f.name: content[f.name] for f in fields(cls) if f.name in content})


@dataclass(frozen=True)
class ServerTotals:
    """The summary's server-side keys: totals over every stage server of the run."""

    num_peers: int | None = None
    """Stage servers the run started with."""
    final_peers_per_stage: list[int] | None = None
    averaging_bytes: int | None = None
    """Bytes of in-stage all-reduces (gradients and state), requests and replies."""
    state_download_bytes: int | None = None
    """Bytes of stage state downloaded by joining or lagging servers."""
    averaging_rounds: int | None = None
    solo_steps: int | None = None
    state_averaging_rounds: int | None = None
    state_downloads: int | None = None
    failed_state_downloads: int | None = None
    averaging_timeouts: int | None = None
    watchdog_exits: dict[str, int] | None = None
    """Servers the watchdog made exit, by reason (churn the swarm inflicts on itself)."""
    request_calls: int | None = None
    mean_requests_per_call: float | None = None
    duplicate_requests: int | None = None
    """Retried backward/tail requests a server had already accumulated (or was accumulating): not accumulated again."""
    failed_rounds: int | None = None
    """All-reduces that gave no usable mean with another member (robust averaging's refusals included)."""
    refused_values: int | None = None
    """Requests refused at the trust boundary for a non-finite or too large value."""
    declined_state_downloads: int | None = None
    """State requests a donor declined, serving another download (not failures: the next donor was tried)."""
    checkpoints_saved: int | None = None
    """Stage checkpoints saved (``swarm.checkpoint_dir``), restores from one, and saves that failed."""
    checkpoint_restores: int | None = None
    failed_checkpoints: int | None = None
    delay_per_stage: list[float | None] | None = None
    """Mean delay (epochs between a forward and its backward) per stage, over all its servers."""
    delay_histogram_per_stage: list[list[int]] | None = None
    """Per stage: ``[tau]`` backwards with that delay."""
    weight_gap_per_stage: list[float | None] | None = None
    """Per stage: mean ``|w_t - w_{t-tau}|`` of its backwards (numerics mode with ``train.delay_history`` > 0)."""
    lookahead_cosine_per_stage: list[float | None] | None = None
    """Per stage: mean cosine between the last update and ``w_t - w_{t-tau}`` (Ajanthan et al. 2025, Proposition 1)."""

    @classmethod
    def of(
        cls, reports: Sequence[ServerReport], num_peers: int, final_peers_per_stage: list[int], averaging_bytes: int,
        state_download_bytes: int,
    ) -> ServerTotals:
        """Counters summed over ``reports``; the byte counts as the backend measured them."""
        calls = sum(r.request_calls for r in reports)
        return cls(
            num_peers=num_peers, final_peers_per_stage=final_peers_per_stage, averaging_bytes=averaging_bytes,
            state_download_bytes=state_download_bytes,
            averaging_rounds=sum(r.averaging_rounds for r in reports), solo_steps=sum(r.solo_steps for r in reports),
            state_averaging_rounds=sum(r.state_averaging_rounds for r in reports),
            state_downloads=sum(r.state_downloads for r in reports),
            failed_state_downloads=sum(r.failed_state_downloads for r in reports),
            averaging_timeouts=sum(r.averaging_timeouts for r in reports), request_calls=calls,
            duplicate_requests=sum(r.duplicate_requests for r in reports),
            failed_rounds=sum(r.failed_rounds for r in reports), refused_values=sum(r.refused_values for r in reports),
            declined_state_downloads=sum(r.declined_state_downloads for r in reports),
            checkpoints_saved=sum(r.checkpoints_saved for r in reports),
            checkpoint_restores=sum(r.checkpoint_restores for r in reports),
            failed_checkpoints=sum(r.failed_checkpoints for r in reports),
            watchdog_exits={reason: sum(r.watchdog_exit == reason for r in reports) for reason in WATCHDOG_REASONS},
            mean_requests_per_call=sum(r.batched_requests for r in reports) / calls if calls else None,
            **_staleness_per_stage(reports, len(final_peers_per_stage)),
        )


def _staleness_per_stage(reports: Sequence[ServerReport], num_stages: int) -> dict[str, list[Any]]:
    """The staleness keys of :class:`ServerTotals`: each stage's servers' histograms and sums pooled."""
    histograms: list[list[int]] = [[] for _ in range(num_stages)]
    sums = {key: [0.0] * num_stages for key in ("weight_gap_sum", "weight_gap_count", "lookahead_cosine_sum", "lookahead_cosine_count")}
    for report in reports:
        pooled = histograms[report.stage]
        for tau, count in enumerate(report.delay_counts or []):
            pooled.extend([0] * (tau + 1 - len(pooled)))
            pooled[tau] += count
        for key, values in sums.items():
            values[report.stage] += getattr(report, key)

    def means(total: str, count: str) -> list[float | None]:
        return [s / n if n else None for s, n in zip(sums[total], sums[count])]

    return {
        "delay_per_stage": [mean_delay(h) for h in histograms], "delay_histogram_per_stage": histograms,
        "weight_gap_per_stage": means("weight_gap_sum", "weight_gap_count"),
        "lookahead_cosine_per_stage": means("lookahead_cosine_sum", "lookahead_cosine_count"),
    }


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: one flat JSON object; the fields of ``trainer_totals`` and ``servers`` are top-level keys."""

    backend: str
    numerics: bool
    """Real tensors (True) or timing mode (False)."""
    model: str | None
    seed: int
    num_stages: int
    num_trainers: int
    schedule: str
    compression: str
    compression_rate: float
    churn: str
    steps: int
    """Global batches completed."""
    samples: int
    tokens: int
    sim_time_s: float
    """Time from the trainers' start to their end: virtual (simulator) or measured (live)."""
    wall_time_s: float
    tokens_per_s: float
    tokens_per_s_steady: float | None
    """Over the second half of the steps logged before the pipeline drains (excludes its fill and its drain)."""
    loss_first: float | None
    loss_last: float | None
    val_loss: float | None
    activation_bytes_per_token: float | None
    """Bytes of forward/backward/tail requests and replies per trained token."""
    micro_batches_started: int
    micro_batches_done: int
    micro_batches_in_flight: int
    """Started and neither done nor dropped when the run ended: started = done + dropped + in flight."""
    rpc_bytes_per_stage: list[int]
    """Bytes of the trainers' successful requests and replies, per stage."""
    trainer_totals: TrainerTotals
    servers: ServerTotals
    churn_events: dict[str, int] | None = None
    """Joins, leaves and crashes replayed, and watchdog exits (simulator)."""
    stage_moves: int | None = None
    """Servers that changed stage to rebalance (simulator)."""
    gpu_utilization: dict[str, float] | None = None
    """Busy fraction of each peer's accelerator (simulator)."""
    dense_activation_bytes_per_token: float | None = None
    """``activation_bytes_per_token`` of the same pipeline without compression (simulator, compressed runs: measured on
    a one-step dense twin, ``node0sim.sim.runner.dense_activation_bytes_per_token``)."""
    request_latency_s: dict[str, dict[str, float]] | None = None
    """Per method (forward, backward, tail, ...): ``p50`` and ``p95`` seconds from call to reply of the trainers'
    successful requests, retries counted apart (both backends)."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON object: every key of ``SUMMARY_KEYS``."""
        content: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            content.update(asdict(value) if is_dataclass(value) else {f.name: value})
        return content


INCOMPLETE_EXIT = 3
"""Exit status of a run that completed fewer steps than asked (without ``train.allow_partial=true``)."""


class IncompleteRun(Exception):
    """A run completed fewer steps than asked; the message says how many and why, as far as the run can tell."""


def _keys(cls: type) -> tuple[str, ...]:
    hints = get_type_hints(cls)
    return tuple(key for f in fields(cls) for key in (_keys(hints[f.name]) if is_dataclass(hints[f.name]) else (f.name,)))


SUMMARY_KEYS = _keys(RunSummary)
"""Every key of ``summary.json``."""


def with_server_reports(
    summary: dict[str, Any], reports: dict[str, ServerReport], num_stages: int, num_peers: int,
) -> dict[str, Any]:
    """A live trainer's summary completed from the servers' exit reports (by peer name): their totals, and
    the reports themselves under ``server_reports``."""
    servers = list(reports.values())
    totals = ServerTotals.of(
        servers, num_peers, [sum(r.stage == s for r in servers) for s in range(num_stages)],
        averaging_bytes=sum(r.averaging_bytes or 0 for r in servers),
        state_download_bytes=sum(r.state_download_bytes or 0 for r in servers),
    )
    return {**summary, **asdict(totals), "server_reports": [{"name": name, **asdict(r)} for name, r in reports.items()]}


def steady_throughput(records: list[dict[str, Any]], drain_start_s: float | None = None, fill_tokens: int = 0) -> float | None:
    """Tokens per second over the second half of the steps logged before ``drain_start_s``, from the first step with
    at least ``fill_tokens`` tokens on if that comes later.

    The window excludes the pipeline's fill and its drain. The fill: the first half of the steps, and at least the
    first two generations of micro-batches in flight (``fill_tokens``): the first starts all at once, and until the
    queues they form at every stage settle the trainers see completions faster than the bottleneck serves (the dense
    100 Gb/s headline cell at 4 in flight, 128 micro-batches of 32 per step, read 18,115 tok/s over steps 4 to 8,
    against its tail stage's bound of 17,620). The drain: once a trainer has started its last micro-batch
    (``drain_start_s``, on the records' clock), fewer micro-batches queue at every stage behind the bottleneck, so the
    last ones reach the trainer sooner after leaving it than earlier ones did; a window that ended at the run's last
    completion counted them at a rate no stage could sustain (17,876 tok/s for the dense 100 Gb/s headline cell
    against the same bound). None: fewer than two steps between the fill and the drain (run more steps).
    """
    steps = [r for r in records if "step" in r and (drain_start_s is None or r["time_s"] <= drain_start_s)]
    if len(steps) < 2:
        return None
    first = max((len(steps) - 1) // 2, next((i for i, r in enumerate(steps) if r["tokens"] >= fill_tokens), len(steps)))
    if first >= len(steps) - 1:
        return None
    mid, last = steps[first], steps[-1]
    elapsed = last["time_s"] - mid["time_s"]
    return (last["tokens"] - mid["tokens"]) / elapsed if elapsed > 0 else None


STALENESS_KEYS = ("delay_per_stage", "delay_histogram_per_stage", "weight_gap_per_stage", "lookahead_cosine_per_stage")


def staleness_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``{"event": "staleness", ...}`` record of ``metrics.jsonl``: the summary's per-stage staleness keys."""
    return {"event": "staleness", "time_s": summary["sim_time_s"], **{key: summary[key] for key in STALENESS_KEYS}}


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``count(2, "crash", "crashes")`` is ``"2 crashes"``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def latency_quantiles(seconds: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """``{method: {"p50": ..., "p95": ...}}`` of per-request seconds (nearest rank, so a single request is both)."""
    def rank(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]

    return {method: {"p50": rank(sorted(v), 0.5), "p95": rank(sorted(v), 0.95)} for method, v in sorted(seconds.items()) if v}


def churn_events(events: dict[str, int] | None) -> str:
    """The churn a run replayed, in words: ``"1 crash, 1 join"``, or ``"no churn"``."""
    if not events or not any(events.values()):
        return "no churn"
    nouns = (("crash", "crash", "crashes"), ("kill", "kill", "kills"), ("leave", "leave", "leaves"), ("join", "join", "joins"))
    return ", ".join(count(events[key], noun, plural) for key, noun, plural in nouns if events.get(key))


def outcome_lines(summary: dict[str, Any]) -> list[str]:
    """What happened in the swarm, in words (printed after a run's ``done:`` line): peers and churn, averaging and
    state downloads, failed requests, the bytes compression saved. Counters a backend did not measure are left out."""
    lines = []
    peers = summary.get("num_peers")
    churn = summary.get("churn_events")
    if peers is not None:
        per_stage = "/".join(str(n) for n in summary["final_peers_per_stage"])
        lines.append(f"swarm: {summary['num_stages']} stages, {peers} peers at the start, {count(summary['num_trainers'], 'trainer')}; "
                     f"{churn_events(churn)}; peers per stage at the end {per_stage}")
    if summary.get("averaging_rounds") is not None:
        lines.append(
            f"averaging: {count(summary['averaging_rounds'], 'gradient round')} with the stage's peers, "
            f"{count(summary['solo_steps'], 'solo step')}, {count(summary['averaging_timeouts'], 'timeout')}; "
            f"{count(summary['state_averaging_rounds'], 'parameter round')} (SPARTA); "
            f"{count(summary['state_downloads'], 'state download')} ({_megabytes(summary['state_download_bytes'] or 0)})"
            + (f", {summary['failed_state_downloads']} failed" if summary["failed_state_downloads"] else "")
            + (f", {summary['declined_state_downloads']} declined" if summary["declined_state_downloads"] else "")
        )
    lines.append(f"requests: {summary['failed_requests']} failed, {summary['retried_requests']} retried on another peer, "
                 f"{count(summary['dropped_micro_batches'], 'micro-batch', 'micro-batches')} dropped")
    measured, dense = summary.get("activation_bytes_per_token"), summary.get("dense_activation_bytes_per_token")
    if measured is not None and dense is not None:
        lines.append(
            f"compression: {summary['compression']} (rate {summary['compression_rate']:g}): {measured:,.0f} activation bytes "
            f"per token instead of {dense:,.0f} dense ({dense / measured:.1f}x fewer), "
            f"{_megabytes((dense - measured) * summary['tokens'])} saved"
        )
    elif measured is not None:
        lines.append(f"compression: {summary['compression']}: {measured:,.0f} activation bytes per token")
    return lines
