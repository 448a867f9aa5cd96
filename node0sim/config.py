"""The run configuration: the schema of the Hydra config tree (``conf/``) and one way to load and validate it.

The section dataclasses (``RunSchema`` lists them) are the schema registered in Hydra's ConfigStore and the only
place a default lives: the YAML files under ``conf/`` set only what differs from them (tests/test_config.py checks
it). ``load_run_config`` builds every section from a resolved mapping with ``build_section``; every error names the
offending key and the allowed values or keys, so a wrong override fails before any work.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from node0sim.data import DataConfig
from node0sim.model import ModelConfig
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.codecs import max_rate
from node0sim.protocol.direct import DIRECT_SCHEDULES, PIPELINES
from node0sim.protocol.stage_compute import OptimConfig
from node0sim.protocol.trainer import TAIL_CALLS
from node0sim.sim.churn import ChurnConfig


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check_type(path: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{path}: a value is required")
    for option in options:
        option = typing.get_origin(option) or option  # dict[str, float] -> dict
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                raise ConfigError(f"{path}: must be a number, got nan")
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option is dict and isinstance(value, Mapping):
            return dict(value)
        if option is list and isinstance(value, (list, tuple)):
            return list(value)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{path}: expected {names}, got {value!r}")


def build_section(cls: type, node: Mapping[str, Any], path: str) -> Any:
    """Instantiate dataclass ``cls`` from the config section ``node`` found at ``path``.

    Keys ``node`` leaves out take the class defaults. Unknown keys, missing required keys, wrong types and values
    the class rejects raise ConfigError naming the key (``path.key: ...``).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(fields)}, got {node!r}")
    unknown = sorted(str(key) for key in node if key not in fields)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in node:
            values[name] = _check_type(f"{path}.{name}", node[name], hints[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}.{name}: missing")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error) if str(error).startswith(path) else f"{path}: {error}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{path}: {value!r} is not one of {list(allowed)}")


MIN_LINK_MBPS = 0.001
"""The slowest access link accepted (1 kbit/s, 1/56 of a dial-up modem): below it even a message's 64-byte header takes
half a second, and a run would only time out; bandwidths are validated against it, not modelled."""


@dataclass(frozen=True)
class NetworkConfig:
    """Access-link bandwidth per peer, latency (uniform or from a region preset) and jitter."""

    name: str
    up_mbps: float
    down_mbps: float
    latency_ms: float | None = None  # None: one-way latency from the region preset; a number overrides it for every pair
    regions: str = "single_region"  # datacenter | single_region | europe | worldwide (node0sim/sim/regions.py)
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        from node0sim.sim.regions import REGION_PRESETS

        for name in ("up_mbps", "down_mbps"):
            value = getattr(self, name)
            _require(
                math.isfinite(value) and value >= MIN_LINK_MBPS,
                f"network.{name}: must be at least {MIN_LINK_MBPS} Mb/s (1 kbit/s), got {value}",
            )
        _require(self.latency_ms is None or self.latency_ms >= 0, f"network.latency_ms: must be >= 0, got {self.latency_ms}")
        _require(self.jitter_ms >= 0, f"network.jitter_ms: must be >= 0, got {self.jitter_ms}")
        _one_of("network.regions", self.regions, tuple(REGION_PRESETS))


@dataclass(frozen=True)
class TopologyConfig:
    """How many stages, servers and trainers the swarm starts with, and how servers rebalance."""

    num_stages: int = 4  # head, body..., tail
    peers_per_stage: int = 1  # initial servers per stage (churn adds and removes peers)
    num_trainers: int = 1  # peers that feed data (each with its own links)
    rebalance_period_s: float = 300.0  # how often a server checks whether moving stage would help (0: never)
    rebalance_margin: float = 0.2  # move only if the pipeline's bottleneck improves by this fraction
    max_batch_requests: int = 1  # >1: a server merges up to this many waiting same-kind requests into one call
    weight_stashing: bool = False  # backward with its forward's weights (PipeDream): one peer per stage, no churn or
    # rebalancing (any peer of a stage could serve a backward otherwise); needs train.delay_history; timing mode: no effect
    tail_calls: str = "fused"  # fused: one tail call (forward + loss + backward: 3F, SWARM-style); separate: a forward
    # call returning the per-token loss, then a backward call that recomputes it (4F), as Node0 serves its tail expert
    stage_assignment: str = "decentralized"  # decentralized: a joiner picks the weakest stage itself (Petals);
    # central: the organizer names it (Node0's authorization server; simulator only: a virtual organizer peer)
    pipeline: str = "relayed"  # relayed: the trainer calls every stage (activations go stage -> trainer -> next stage,
    # SWARM/hivemind); direct: each stage server sends its output to a peer of the next stage (node0sim/protocol/direct.py)
    schedule: str = "1f1b"  # with pipeline=direct: 1f1b (at most num_stages micro-batches in flight per trainer, each
    # backward starts when its forward reaches the tail; train.max_inflight is not used) or gpipe (all forwards of a
    # step's micro-batches, then all backwards)

    def __post_init__(self) -> None:
        _require(self.num_stages >= 1, f"topology.num_stages: must be >= 1, got {self.num_stages}")
        _require(self.max_batch_requests >= 1, f"topology.max_batch_requests: must be >= 1, got {self.max_batch_requests}")
        _one_of("topology.tail_calls", self.tail_calls, TAIL_CALLS)
        _one_of("topology.pipeline", self.pipeline, PIPELINES)
        _one_of("topology.schedule", self.schedule, DIRECT_SCHEDULES)
        _require(self.pipeline == "relayed" or self.tail_calls == "fused",
                 "topology.tail_calls: separate needs topology.pipeline=relayed (the direct pipeline's tail is one fused call)")
        _require(self.peers_per_stage >= 1, f"topology.peers_per_stage: must be >= 1, got {self.peers_per_stage}")
        _require(self.num_trainers >= 1, f"topology.num_trainers: must be >= 1, got {self.num_trainers}")
        _require(self.rebalance_period_s >= 0, f"topology.rebalance_period_s: must be >= 0, got {self.rebalance_period_s}")
        _require(self.rebalance_margin >= 0, f"topology.rebalance_margin: must be >= 0, got {self.rebalance_margin}")
        _require(self.stage_assignment in ("decentralized", "central"),
                 f"topology.stage_assignment: must be decentralized or central, got {self.stage_assignment!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Batch sizes, schedule and stopping rules."""

    steps: int = 200  # global batches pushed through the pipeline
    batch_size: int = 16  # sequences per global batch (each stage updates once per batch_size samples)
    micro_batch_size: int = 4
    seq_len: int = 128
    schedule: str = "sync"  # sync: GPipe-style flush per step; async: keep max_inflight micro-batches in flight
    max_inflight: int = 4
    max_sim_time_s: float | None = None  # stop at this much virtual time
    request_timeout_s: float = 30.0
    max_retries: int = 3
    ban_s: float = 60.0  # a peer whose request failed is not chosen for this long (0: never banned)
    max_ban_s: float = 960.0  # each further failure in a row (no success between) doubles its ban, up to this
    max_abs_value: float = 1e8  # the largest |value| of an activation or gradient a server accepts, the trainer too in a
    # reply (node0sim/protocol/bounds.py). Measured (tools/measure_bounds.py, 200 steps, seeds 0 and 1): at most 36.8 in
    # the default run, 14.2 in minimal, 35.1 in node0_tiny; open LLMs' largest activations reach ~7e5 (Gemma3-27B-it,
    # arXiv 2605.15572); a 1e8 entry's square (1e16), summed over d = 4096, stays far below float32's max 3.4e38
    max_loss_ratio: float = 10.0  # a reply's loss must be in [0, this x ln(vocab size)]: ln V is a uniform prediction's
    # loss, where training starts; measured as above: at most 1.017 x ln V (the first steps)
    hedge_quantile: float | None = None  # null: no hedging; q in (0, 1): a call unanswered after the q-quantile of its
    # stage's latest latencies also goes to another replica, the first valid reply wins (0.95: Dean & Barroso, "The Tail at
    # Scale", CACM 2013). Off by default: Node0's code (PluralisResearch/node0 at 32bd084) has no hedging
    probe_timeout_s: float | None = None  # null: every peer a stage record lists gets work at once; > 0: a newly listed
    # peer first answers a probe within this time (or is banned), so entries nobody serves cost no micro-batch a retry or
    # timeout. Off by default: Node0's code (as above) has no such check, and a probe delays a new peer's first work by
    # one round trip
    eval_batches: int = 4  # validation batches evaluated at the end
    delay_history: int = 0  # numerics mode: epochs of flat weights each server keeps, to measure the weight gap and
    # look-ahead cosine of stale backwards (and for topology.weight_stashing); 0: none (the delay is measured anyway)
    skip_if_done: bool = False  # true: a run whose output dir has a complete summary.json prints "already done"
    allow_partial: bool = False  # false: a run that completes fewer than train.steps exits non-zero (saying why)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"train.steps: must be >= 1, got {self.steps}")
        _require(self.micro_batch_size >= 1, f"train.micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        _require(self.batch_size >= 1, f"train.batch_size: must be >= 1, got {self.batch_size}")
        _require(
            self.batch_size >= self.micro_batch_size and self.batch_size % self.micro_batch_size == 0,
            f"train.batch_size: must be a multiple of train.micro_batch_size ({self.micro_batch_size}), got {self.batch_size}",
        )
        _require(self.seq_len >= 2, f"train.seq_len: must be >= 2, got {self.seq_len}")
        _one_of("train.schedule", self.schedule, ("sync", "async"))
        _require(self.max_inflight >= 1, f"train.max_inflight: must be >= 1, got {self.max_inflight}")
        _require(
            self.max_sim_time_s is None or self.max_sim_time_s > 0,
            f"train.max_sim_time_s: must be > 0 or null, got {self.max_sim_time_s}",
        )
        _require(self.request_timeout_s > 0, f"train.request_timeout_s: must be > 0, got {self.request_timeout_s}")
        _require(self.max_retries >= 0, f"train.max_retries: must be >= 0, got {self.max_retries}")
        _require(self.ban_s >= 0, f"train.ban_s: must be >= 0, got {self.ban_s}")
        _require(self.max_ban_s >= self.ban_s, f"train.max_ban_s: must be >= train.ban_s ({self.ban_s}), got {self.max_ban_s}")
        _require(self.max_abs_value > 0, f"train.max_abs_value: must be > 0, got {self.max_abs_value}")
        _require(self.max_loss_ratio > 0, f"train.max_loss_ratio: must be > 0, got {self.max_loss_ratio}")
        _require(self.hedge_quantile is None or 0 < self.hedge_quantile < 1,
                 f"train.hedge_quantile: must be in (0, 1) or null, got {self.hedge_quantile}")
        _require(self.probe_timeout_s is None or self.probe_timeout_s > 0,
                 f"train.probe_timeout_s: must be > 0 or null, got {self.probe_timeout_s}")
        _require(self.eval_batches >= 0, f"train.eval_batches: must be >= 0, got {self.eval_batches}")
        _require(self.delay_history >= 0, f"train.delay_history: must be >= 0, got {self.delay_history}")

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches in one global batch."""
        return self.batch_size // self.micro_batch_size


@dataclass(frozen=True)
class SimConfig:
    """Simulator settings: numerics or timing mode, the GPU cost model, DHT latency, limits."""

    numerics: bool = True  # true: real tensors, loss curves; false: timing mode (sizes and FLOPs only)
    gpu: str = "rtx3090"  # cost model profile: t4 | rtx3090 | rtx4090 | l4 | a100 | h100
    utilization: float = 0.4  # flat compute model: achieved fraction of the GPU's peak FLOP/s
    dht_latency_ms: float = 50.0  # cost of one DHT get/store
    max_message_mb: float = 1024.0  # larger RPC payloads are refused
    timing_dtype: str = "bfloat16"  # wire dtype of activations in timing mode
    max_numerics_params: int = 500_000_000  # refuse numerics mode above this (use timing mode)
    gpu_mix: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. {rtx3090: 1, a100: 1}: each peer draws its GPU
    snapshot_period_s: float = 60.0  # how often the swarm's state (peers per stage, ...) is logged
    link_sharing: str = "maxmin"  # maxmin: exact max-min fair; equal: per-link equal split (fast, huge swarms);
    # per_link: each link its own processor-sharing queue (fastest, slightly optimistic)
    pair_streams: str = "shared"  # shared: messages between two peers in flight at once share the links (libp2p
    # multiplexes hivemind's streams over one connection, yamux); serial: one at a time per direction, each holding the
    # pair for its bytes and latency (ProtocolNanoGPT's meter, train_gpt.py SimPipelineStage.add_delay, which timed its records)
    call_overhead_ms: float = 0.1  # fixed time per accelerator call (kernel launches, dispatch); batching saves it
    compute_model: str = "flat"  # flat: FLOPs / (peak x utilization) | roofline: per operation max(FLOPs / (peak x
    # efficiency(matmul size)), bytes / memory bandwidth), the optimizer step as memory traffic (node0sim/sim/gpus.py)
    compute_dtype: str = "bfloat16"  # the peak both models use: bfloat16 (16-bit tensor cores) | tf32 | float32 (no
    # tensor cores: PyTorch's default for fp32 tensors, how Node0 trains)
    check_memory: bool = True  # refuse a run whose stages do not fit in their GPU's memory (false: run anyway, e.g. in a sweep)
    transport: str = "fluid"  # fluid: latency + bytes / fair share; tcp: + framing, window / RTT cap, slow start, RPC cost
    tcp_window_kib: float = 256.0  # per-stream window: libp2p/go-yamux const.go initialStreamWindow = 256 KiB (grows to 16 MiB)
    tcp_slow_start_after_idle: bool = True  # restart slow start after an idle RTO (Linux tcp_slow_start_after_idle=1)
    tcp_message_overhead_bytes: float = 623.0  # per message on the wire: tools/bench_wire.py, 10 Mb/s lab, measured 623 B
    tcp_byte_overhead: float = 1.0466  # wire bytes per payload byte (headers per segment): tools/bench_wire.py, measured 1.0466
    tcp_rpc_overhead_ms: float = 2.67  # fixed time per RPC (event loops, p2pd hops): tools/bench_wire.py, measured 2.67 ms
    tcp_software_mb_per_s: float = 129.0  # most payload MB/s the live stack encodes, copies and decodes per message (a rate
    # cap, pipelined with the link): tools/bench_wire.py, unshaped lab link, measured 2.67 ms + payload / 129 MB/s per call
    tcp_rtt_ms: float | None = None  # the round trip the transport sees; null: twice the pair's one-way latency. Set it where
    # the latency is not on the path (the fidelity lab's software-injected latency: fidelity.py gives the lab's own RTT)

    def __post_init__(self) -> None:
        from node0sim.sim.engine import PAIR_STREAMS
        from node0sim.sim.gpus import COMPUTE_DTYPES, GPU_PROFILES

        _one_of("sim.gpu", self.gpu, tuple(GPU_PROFILES))
        for name, weight in self.gpu_mix.items():
            _one_of("sim.gpu_mix", name, tuple(GPU_PROFILES))
            _require(weight >= 0, f"sim.gpu_mix.{name}: weight must be >= 0, got {weight}")
        _require(self.snapshot_period_s > 0, f"sim.snapshot_period_s: must be > 0, got {self.snapshot_period_s}")
        _one_of("sim.link_sharing", self.link_sharing, ("maxmin", "equal", "per_link"))
        _one_of("sim.transport", self.transport, ("fluid", "tcp"))
        _one_of("sim.pair_streams", self.pair_streams, PAIR_STREAMS)
        _require(not (self.transport == "tcp" and self.link_sharing == "per_link"),
                 "sim.transport=tcp needs sim.link_sharing=maxmin or equal (per_link has no per-flow rate caps)")
        _require(self.tcp_window_kib > 0, f"sim.tcp_window_kib: must be > 0, got {self.tcp_window_kib}")
        _require(self.tcp_message_overhead_bytes >= 0,
                 f"sim.tcp_message_overhead_bytes: must be >= 0, got {self.tcp_message_overhead_bytes}")
        _require(self.tcp_byte_overhead >= 1, f"sim.tcp_byte_overhead: must be >= 1, got {self.tcp_byte_overhead}")
        _require(self.tcp_rpc_overhead_ms >= 0, f"sim.tcp_rpc_overhead_ms: must be >= 0, got {self.tcp_rpc_overhead_ms}")
        _require(self.tcp_software_mb_per_s > 0, f"sim.tcp_software_mb_per_s: must be > 0, got {self.tcp_software_mb_per_s}")
        _require(self.tcp_rtt_ms is None or self.tcp_rtt_ms >= 0, f"sim.tcp_rtt_ms: must be >= 0 or null, got {self.tcp_rtt_ms}")
        _require(0 < self.utilization <= 1, f"sim.utilization: must be in (0, 1], got {self.utilization}")
        _require(self.dht_latency_ms >= 0, f"sim.dht_latency_ms: must be >= 0, got {self.dht_latency_ms}")
        _require(self.max_message_mb > 0, f"sim.max_message_mb: must be > 0, got {self.max_message_mb}")
        _require(self.call_overhead_ms >= 0, f"sim.call_overhead_ms: must be >= 0, got {self.call_overhead_ms}")
        _one_of("sim.timing_dtype", self.timing_dtype, ("float32", "bfloat16", "float16"))
        _one_of("sim.compute_model", self.compute_model, ("flat", "roofline"))
        _one_of("sim.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)


COMPRESSIONS = ("none", "subspace", "random_projection", "topk", "quantize")


@dataclass(frozen=True)
class CompressionConfig:
    """How activations and their gradients cross stage boundaries.

    ``rate``: dense bytes / wire bytes (subspace and random_projection: k = dim / rate; topk: values
    and int16 indices in 1/rate of the dense bytes). ``bits``: 8 or 4 for quantize. ``basis``: where
    the subspace basis U and fixed embedding T come from: null (generated from ``seed``), a local
    file, or ``hf://<repo_id>/<filename>`` on the Hugging Face Hub. ``project_gradients`` (subspace):
    project the constrained weights' gradients onto U before the optimizer step as well as the weights
    after it; false projects only the weights after the step (Node0's ``ss_regularize``).
    """

    name: str = "none"
    rate: float = 1.0
    bits: int = 8
    basis: str | None = None
    seed: int = 0
    project_gradients: bool = True

    def __post_init__(self) -> None:
        _one_of("compression", self.name, COMPRESSIONS)
        _require(self.rate >= 1, f"compression.rate: must be >= 1, got {self.rate}")
        _require(self.bits in (4, 8), f"compression.bits: must be 8 or 4, got {self.bits}")


SCALES = ("small", "paper")


@dataclass(frozen=True)
class ScaleConfig:
    """Which size preset (``conf/scale/``) the run was composed with: ``small`` (CPU minutes) or ``paper``."""

    name: str = "small"

    def __post_init__(self) -> None:
        _one_of("scale", self.name, SCALES)


WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases tracking (``node0sim/tracking.py``); ``metrics.jsonl`` stays the source of truth.

    ``mode``: null uses ``$WANDB_MODE`` when set, else ``offline`` (nothing leaves the machine).
    """

    enabled: bool = True  # log config, metrics and summary to Weights & Biases (never fatal)
    project: str = "node0sim"
    entity: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.project), "wandb.project: must not be empty")
        if self.mode is not None:
            _one_of("wandb.mode", self.mode, WANDB_MODES)


SEARCH_OBJECTIVES = ("none", "min_uplink", "time_to_loss")


@dataclass(frozen=True)
class SearchConfig:
    """The value a run returns to a search sweeper (``hydra/sweeper=optuna``), to be minimized (``node0sim/search.py``).

    ``min_uplink``: ``network.up_mbps`` if the run keeps ``throughput_fraction`` of the tokens/s the same run reaches
    with datacenter bandwidth (``network=datacenter``'s up/down rates, its own latency; simulated after it), else
    infinity (infeasible). ``time_to_loss``: virtual seconds
    until the training loss, averaged over ``loss_window`` consecutive steps, first reaches ``target_loss``; infinity
    if it never does.
    """

    objective: str = "none"  # none: return nothing (grid sweeps) | min_uplink | time_to_loss
    throughput_fraction: float = 0.9
    target_loss: float | None = None
    loss_window: int = 5

    def __post_init__(self) -> None:
        _one_of("search.objective", self.objective, SEARCH_OBJECTIVES)
        _require(0 < self.throughput_fraction <= 1, f"search.throughput_fraction: must be in (0, 1], got {self.throughput_fraction}")
        _require(self.loss_window >= 1, f"search.loss_window: must be >= 1, got {self.loss_window}")
        _require(
            self.objective != "time_to_loss" or self.target_loss is not None,
            "search.target_loss: a value is required with search.objective=time_to_loss",
        )


SWARM_ROLES = ("local", "bootstrap", "server", "trainer")


@dataclass(frozen=True)
class SwarmConfig:
    """The live swarm (``backend=swarm``): this peer's role, addresses, identity and device.

    ``initial_peers``: multiaddrs printed by the bootstrap (``/ip4/<ip>/tcp/<port>/p2p/<peer id>``).
    ``organizer_key``: fingerprint of the key that signed the run configuration (printed by the
    bootstrap); servers and trainers refuse configurations signed by anyone else.
    """

    role: str = "local"  # local: a whole swarm on 127.0.0.1 | bootstrap | server | trainer
    initial_peers: list[str] = dataclasses.field(default_factory=list)
    organizer_key: str | None = None
    host: str = "0.0.0.0"  # listen address (the local role always uses 127.0.0.1)
    host_port: int = 0  # listen port (0: any free port)
    announce_host: str | None = None  # public address others should dial, if different (port forwarding)
    announce_port: int | None = None
    identity_path: str = "private.key"  # persistent peer identity (created owner-only on first start, reused to rejoin)
    info_path: str | None = None  # bootstrap: also write its multiaddrs and key fingerprint to this JSON file
    stage: int | None = None  # server: serve this stage (None: the stage that limits the pipeline most)
    trainer_index: int = 0  # trainer: which of topology.num_trainers data shards to stream
    device: str = "cpu"  # cpu | cuda | cuda:<index>
    nat_traversal: bool = False  # UPnP port mapping, AutoNAT and relays (off: only direct connections)
    startup_timeout_s: float = 60.0  # how long to wait for the daemon, the bootstrap and the run configuration
    log_period_s: float = 60.0  # server: "Processed N batches in last 60 seconds" every this many seconds
    max_message_mb: float = 256.0  # larger RPC messages are refused
    all_reduce: str = "hivemind"  # in-stage all-reduce: hivemind (its AllReduceRunner) | protocol (the simulator's, over RPC)
    bandwidth_probe_mb: float = 1.0  # server: time this many MB to the bootstrap at join and announce the measured uplink
    # (0: announce network.up_mbps; a failed probe falls back to it with a warning)
    injected_latency_ms: float = 0.0  # software-injected one-way delay before every RPC message this peer sends
    # (the fidelity lab's latency where the kernel has no netem; 0: none)
    run_config_lifetime_h: float = 24.0  # bootstrap: the signed run configuration expires this long after its latest
    # refresh; joined peers re-store it unchanged, so peers can join that long after the bootstrap left
    admission: str = "open"  # bootstrap: open (anyone may join) | token (only peers with a token it signed; swarm.admission)
    # the bootstrap's choice is published with the run configuration and binds every peer
    admission_token: str | None = None  # this peer's token file, from `python -m swarm.admission issue` (admission=token)
    checkpoint_dir: str | None = None  # server: save its stage's state here, and start from it where the stage has no
    # ready peer (a folder per run; see "Checkpoints" in the README)
    checkpoint_every_epochs: int = 1  # server: save every this many epochs (swarm.checkpoint_dir)

    def __post_init__(self) -> None:
        _one_of("swarm.role", self.role, SWARM_ROLES)
        _one_of("swarm.all_reduce", self.all_reduce, ("hivemind", "protocol"))
        _one_of("swarm.admission", self.admission, ("open", "token"))
        for name in ("host_port", "announce_port"):
            port = getattr(self, name)
            _require(port is None or 0 <= port <= 65535, f"swarm.{name}: must be a TCP port (0-65535), got {port}")
        _require(
            all(isinstance(p, str) and "/p2p/" in p for p in self.initial_peers),
            f"swarm.initial_peers: each entry must be a full multiaddr ending in /p2p/<peer id>, got {self.initial_peers}",
        )
        _require(
            self.device in ("cpu", "cuda") or self.device.startswith("cuda:") and self.device[5:].isdigit(),
            f"swarm.device: 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}",
        )
        _require(self.stage is None or self.stage >= 0, f"swarm.stage: must be >= 0 or null, got {self.stage}")
        _require(self.bandwidth_probe_mb >= 0, f"swarm.bandwidth_probe_mb: must be >= 0, got {self.bandwidth_probe_mb}")
        _require(self.injected_latency_ms >= 0, f"swarm.injected_latency_ms: must be >= 0, got {self.injected_latency_ms}")
        _require(self.trainer_index >= 0, f"swarm.trainer_index: must be >= 0, got {self.trainer_index}")
        _require(self.checkpoint_every_epochs >= 1, f"swarm.checkpoint_every_epochs: must be >= 1, got {self.checkpoint_every_epochs}")
        for name in ("startup_timeout_s", "log_period_s", "max_message_mb", "run_config_lifetime_h"):
            _require(getattr(self, name) > 0, f"swarm.{name}: must be > 0, got {getattr(self, name)}")
        if self.role in ("server", "trainer"):
            _require(bool(self.initial_peers), f"swarm.initial_peers: a {self.role} needs the bootstrap's multiaddr")
            _require(bool(self.organizer_key), f"swarm.organizer_key: a {self.role} needs the fingerprint printed by the bootstrap")


BACKENDS = ("sim", "swarm")


@dataclass(frozen=True)
class BackendConfig:
    """The runtime the protocol runs on (``conf/backend/``): ``sim`` (the emulator) or ``swarm`` (live hivemind peers)."""

    name: str = "sim"

    def __post_init__(self) -> None:
        _one_of("backend", self.name, BACKENDS)


def _model_schema() -> type:
    """``ModelConfig``'s fields and defaults, with ``vocab_size`` optional: null takes the tokenizer's vocabulary
    (``experiment.model_config`` fills it in once the tokenizer is known)."""
    hints = typing.get_type_hints(ModelConfig)
    fields = [
        (f.name, hints[f.name] | None if f.name == "vocab_size" else hints[f.name], dataclasses.field(default=f.default))
        for f in dataclasses.fields(ModelConfig)
    ]
    return dataclasses.make_dataclass("ModelSchema", fields, frozen=True)


ModelSchema = _model_schema()


@dataclass
class RunSchema:
    """The root of the config tree: the run's seed and DHT key prefix, and the class of every section.

    ``schema()`` turns it into the node Hydra composes ``conf/`` onto; ``load_run_config`` builds each section
    from its class.
    """

    seed: int = 0
    run_id: str = "node0sim"  # prefix of this run's DHT keys
    backend: BackendConfig = MISSING
    model: ModelSchema = MISSING
    network: NetworkConfig = MISSING
    topology: TopologyConfig = MISSING
    train: TrainConfig = MISSING
    sim: SimConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
    churn: ChurnConfig = MISSING
    compression: CompressionConfig = MISSING
    averaging: AveragingConfig = MISSING
    scale: ScaleConfig = MISSING
    search: SearchConfig = MISSING
    wandb: WandbConfig = MISSING
    swarm: SwarmConfig = MISSING


def schema_sections() -> dict[str, type]:
    """Each section's name and its class, in ``RunSchema`` order."""
    return {name: hint for name, hint in typing.get_type_hints(RunSchema).items() if dataclasses.is_dataclass(hint)}


def schema() -> DictConfig:
    """``RunSchema`` as an OmegaConf node: typed, with every section's defaults (required keys ``???``).

    Nodes of the (frozen) section classes are copied writable, so YAML and overrides merge onto them; mapping
    fields (``gpu_mix``) accept new keys under Hydra's struct mode, so ``sim.gpu_mix="{a100: 1}"`` works.
    """
    root = OmegaConf.structured(RunSchema)
    for name, cls in schema_sections().items():
        root[name] = OmegaConf.structured(cls)
        for key, hint in typing.get_type_hints(cls).items():
            if (typing.get_origin(hint) or hint) is dict:
                OmegaConf.set_struct(root[name][key], False)
    return root


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, validated."""

    backend: str
    seed: int
    run_id: str
    model: Mapping[str, Any]
    network: NetworkConfig
    topology: TopologyConfig
    train: TrainConfig
    sim: SimConfig
    optim: OptimConfig
    data: DataConfig
    churn: ChurnConfig
    compression: CompressionConfig
    averaging: AveragingConfig
    scale: ScaleConfig = ScaleConfig()
    search: SearchConfig = SearchConfig()
    wandb: WandbConfig = WandbConfig()
    swarm: SwarmConfig = SwarmConfig()


def load_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Validate a resolved config mapping (``OmegaConf.to_container(cfg, resolve=True)``, or the configuration a
    bootstrap publishes): each section through ``build_section`` with its ``RunSchema`` class, then the checks
    that span sections."""
    hints = typing.get_type_hints(RunSchema)
    unknown = sorted(set(cfg) - set(hints) - {"hydra"})
    _require(not unknown, f"unknown top-level key(s) {unknown}; allowed: {list(hints)}")
    missing = [name for name in hints if name not in cfg]
    _require(not missing, f"missing config section(s) {missing}")
    values = {
        name: build_section(hint, cfg[name], name) if dataclasses.is_dataclass(hint) else _check_type(name, cfg[name], hint)
        for name, hint in hints.items()
    }
    model = values["model"]
    vocab_size = 1 if model.vocab_size is None else model.vocab_size  # null: the tokenizer's (checked once it is known)
    try:
        architecture = ModelConfig(**{**dataclasses.asdict(model), "vocab_size": vocab_size})
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None
    run = RunConfig(**{**values, "backend": values["backend"].name, "model": dataclasses.asdict(model)})
    _require(
        run.sim.numerics or model.vocab_size is not None,
        "model.vocab_size: must be set in timing mode (sim.numerics=false)",
    )
    _require(
        run.train.seq_len <= architecture.max_seq_len,
        f"train.seq_len: {run.train.seq_len} exceeds model.max_seq_len ({architecture.max_seq_len})",
    )
    _require(
        run.topology.num_stages <= architecture.n_layers,
        f"topology.num_stages: {run.topology.num_stages} stages need at least as many layers, "
        f"model.n_layers is {architecture.n_layers}",
    )
    _require(
        run.train.schedule == "async" or run.topology.num_trainers == 1,
        "train.schedule=sync needs topology.num_trainers=1 (there is no barrier across trainers); "
        "use train.schedule=async with several trainers",
    )
    _check_compression_rate(run, architecture.dim)
    _require(
        run.search.objective == "none" or run.backend == "sim",
        f"search.objective: {run.search.objective!r} is computed from a simulated run; needs backend=sim",
    )
    _require(
        run.swarm.checkpoint_dir is None or run.backend == "swarm",
        "swarm.checkpoint_dir: checkpoints are kept by live stage servers (backend=swarm); the simulator keeps none",
    )
    _check_weight_stashing(run)
    return run


def _check_compression_rate(run: RunConfig, dim: int) -> None:
    """A rate above what the codec reaches at this width would be clamped silently: refused, naming the maximum."""
    activation_bytes = 4 if run.sim.numerics else getattr(torch, run.sim.timing_dtype).itemsize
    highest = max_rate(run.compression.name, dim, activation_bytes)
    _require(
        run.compression.rate <= highest,
        f"compression.rate: {run.compression.rate:g} is above the maximum {highest:g} of compression={run.compression.name} "
        f"for this model (model.dim={dim})",
    )


def _check_weight_stashing(run: RunConfig) -> None:
    """Weight stashing keeps each forward's weights on the peer that ran it: refused where another peer may serve the
    backward (several peers per stage, churn, rebalancing), and it needs a weight history in numerics mode."""
    if not run.topology.weight_stashing:
        return
    refusals = [
        (run.topology.peers_per_stage == 1, f"topology.peers_per_stage is {run.topology.peers_per_stage} (needs 1)"),
        (run.churn.name == "none", f"churn is {run.churn.name!r} (needs 'none')"),
        (run.topology.rebalance_period_s == 0, f"topology.rebalance_period_s is {run.topology.rebalance_period_s} (needs 0)"),
    ]
    for permitted, reason in refusals:
        _require(permitted, f"topology.weight_stashing: any peer of a stage may serve the backward here ({reason})")
    _require(
        not run.sim.numerics or run.train.delay_history >= 1,
        "topology.weight_stashing: needs train.delay_history >= 1 (epochs of weights kept; above the largest delay)",
    )
