"""Typed, validated run configuration built from the Hydra config tree (``conf/``).

Every error names the offending key and the allowed values, so a wrong override fails fast.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from node0sim.data import DataConfig
from node0sim.protocol.averaging import AveragingConfig
from node0sim.sim.churn import ChurnConfig
from node0sim.protocol.stage_compute import OptimConfig


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check_type(path: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{path}: a value is required")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
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
    """Instantiate dataclass ``cls`` from ``node``, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
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


@dataclass(frozen=True)
class NetworkConfig:
    """Access-link bandwidth per peer, latency (uniform or from a region preset) and jitter."""

    name: str
    up_mbps: float
    down_mbps: float
    latency_ms: float | None = None
    regions: str = "single_region"
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        from node0sim.sim.regions import REGION_PRESETS

        _require(self.up_mbps > 0, f"network.up_mbps: must be > 0, got {self.up_mbps}")
        _require(self.down_mbps > 0, f"network.down_mbps: must be > 0, got {self.down_mbps}")
        _require(self.latency_ms is None or self.latency_ms >= 0, f"network.latency_ms: must be >= 0, got {self.latency_ms}")
        _require(self.jitter_ms >= 0, f"network.jitter_ms: must be >= 0, got {self.jitter_ms}")
        _one_of("network.regions", self.regions, tuple(REGION_PRESETS))


@dataclass(frozen=True)
class TopologyConfig:
    """How many stages, servers and trainers the swarm starts with, and how servers rebalance."""

    num_stages: int
    peers_per_stage: int = 1
    num_trainers: int = 1
    rebalance_period_s: float = 300.0
    rebalance_margin: float = 0.2
    max_batch_requests: int = 1

    def __post_init__(self) -> None:
        _require(self.num_stages >= 1, f"topology.num_stages: must be >= 1, got {self.num_stages}")
        _require(self.max_batch_requests >= 1, f"topology.max_batch_requests: must be >= 1, got {self.max_batch_requests}")
        _require(self.peers_per_stage >= 1, f"topology.peers_per_stage: must be >= 1, got {self.peers_per_stage}")
        _require(self.num_trainers >= 1, f"topology.num_trainers: must be >= 1, got {self.num_trainers}")
        _require(self.rebalance_period_s >= 0, f"topology.rebalance_period_s: must be >= 0, got {self.rebalance_period_s}")
        _require(self.rebalance_margin >= 0, f"topology.rebalance_margin: must be >= 0, got {self.rebalance_margin}")


@dataclass(frozen=True)
class TrainConfig:
    """Batch sizes, schedule and stopping rules."""

    steps: int
    batch_size: int
    micro_batch_size: int
    seq_len: int
    schedule: str = "sync"
    max_inflight: int = 4
    max_sim_time_s: float | None = None
    request_timeout_s: float = 30.0
    max_retries: int = 3
    eval_batches: int = 4
    skip_if_done: bool = False

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"train.steps: must be >= 1, got {self.steps}")
        _require(self.micro_batch_size >= 1, f"train.micro_batch_size: must be >= 1, got {self.micro_batch_size}")
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
        _require(self.eval_batches >= 0, f"train.eval_batches: must be >= 0, got {self.eval_batches}")

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches in one global batch."""
        return self.batch_size // self.micro_batch_size


@dataclass(frozen=True)
class SimConfig:
    """Simulator settings: numerics or timing mode, the GPU cost model, DHT latency, limits."""

    numerics: bool = True
    gpu: str = "rtx3090"
    utilization: float = 0.4
    dht_latency_ms: float = 50.0
    max_message_mb: float = 1024.0
    timing_dtype: str = "bfloat16"
    max_numerics_params: int = 500_000_000
    gpu_mix: dict = dataclasses.field(default_factory=dict)
    snapshot_period_s: float = 60.0
    link_sharing: str = "maxmin"
    call_overhead_ms: float = 0.1

    def __post_init__(self) -> None:
        from node0sim.sim.gpus import GPU_PROFILES

        _one_of("sim.gpu", self.gpu, tuple(GPU_PROFILES))
        for name, weight in self.gpu_mix.items():
            _one_of("sim.gpu_mix", name, tuple(GPU_PROFILES))
            _require(weight >= 0, f"sim.gpu_mix.{name}: weight must be >= 0, got {weight}")
        _require(self.snapshot_period_s > 0, f"sim.snapshot_period_s: must be > 0, got {self.snapshot_period_s}")
        _one_of("sim.link_sharing", self.link_sharing, ("maxmin", "equal", "per_link"))
        _require(0 < self.utilization <= 1, f"sim.utilization: must be in (0, 1], got {self.utilization}")
        _require(self.dht_latency_ms >= 0, f"sim.dht_latency_ms: must be >= 0, got {self.dht_latency_ms}")
        _require(self.max_message_mb > 0, f"sim.max_message_mb: must be > 0, got {self.max_message_mb}")
        _require(self.call_overhead_ms >= 0, f"sim.call_overhead_ms: must be >= 0, got {self.call_overhead_ms}")
        _one_of("sim.timing_dtype", self.timing_dtype, ("float32", "bfloat16", "float16"))


COMPRESSIONS = ("none", "subspace", "random_projection", "topk", "quantize")


@dataclass(frozen=True)
class CompressionConfig:
    """How activations and their gradients cross stage boundaries.

    ``rate``: dense bytes / wire bytes (subspace and random_projection: k = dim / rate; topk: values
    and int16 indices in 1/rate of the dense bytes). ``bits``: 8 or 4 for quantize. ``basis``: where
    the subspace basis U and fixed embedding T come from: null (generated from ``seed``), a local
    file, or ``hf://<repo_id>/<filename>`` on the Hugging Face Hub.
    """

    name: str = "none"
    rate: float = 1.0
    bits: int = 8
    basis: str | None = None
    seed: int = 0

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

    enabled: bool = True
    project: str = "node0sim"
    entity: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.project), "wandb.project: must not be empty")
        if self.mode is not None:
            _one_of("wandb.mode", self.mode, WANDB_MODES)


SWARM_ROLES = ("local", "bootstrap", "server", "trainer")


@dataclass(frozen=True)
class SwarmConfig:
    """The live swarm (``backend=swarm``): this peer's role, addresses, identity and device.

    ``initial_peers``: multiaddrs printed by the bootstrap (``/ip4/<ip>/tcp/<port>/p2p/<peer id>``).
    ``organizer_key``: fingerprint of the key that signed the run configuration (printed by the
    bootstrap); servers and trainers refuse configurations signed by anyone else.
    """

    role: str = "local"
    initial_peers: list = dataclasses.field(default_factory=list)
    organizer_key: str | None = None
    host: str = "0.0.0.0"
    host_port: int = 0
    announce_host: str | None = None
    announce_port: int | None = None
    identity_path: str = "private.key"
    info_path: str | None = None
    stage: int | None = None
    trainer_index: int = 0
    device: str = "cpu"
    nat_traversal: bool = False
    startup_timeout_s: float = 60.0
    log_period_s: float = 60.0
    max_message_mb: float = 256.0
    all_reduce: str = "hivemind"

    def __post_init__(self) -> None:
        _one_of("swarm.role", self.role, SWARM_ROLES)
        _one_of("swarm.all_reduce", self.all_reduce, ("hivemind", "protocol"))
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
        _require(self.trainer_index >= 0, f"swarm.trainer_index: must be >= 0, got {self.trainer_index}")
        for name in ("startup_timeout_s", "log_period_s", "max_message_mb"):
            _require(getattr(self, name) > 0, f"swarm.{name}: must be > 0, got {getattr(self, name)}")
        if self.role in ("server", "trainer"):
            _require(bool(self.initial_peers), f"swarm.initial_peers: a {self.role} needs the bootstrap's multiaddr")
            _require(bool(self.organizer_key), f"swarm.organizer_key: a {self.role} needs the fingerprint printed by the bootstrap")


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
    wandb: WandbConfig = WandbConfig()
    swarm: SwarmConfig = SwarmConfig()


SECTIONS = (
    "backend", "seed", "run_id", "model", "network", "topology", "train", "sim", "optim", "data", "churn",
    "compression", "averaging", "scale", "wandb", "swarm",
)


def _name_only(node: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> str:
    extra = sorted(set(node) - {"name"})
    _require(not extra, f"{path}: unknown key(s) {extra}")
    _one_of(f"{path}", node.get("name"), allowed)
    return node["name"]


def load_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Validate a resolved config mapping (``OmegaConf.to_container(cfg, resolve=True)``)."""
    unknown = sorted(set(cfg) - set(SECTIONS) - {"hydra"})
    _require(not unknown, f"unknown top-level key(s) {unknown}; allowed: {list(SECTIONS)}")
    missing = [s for s in SECTIONS if s not in cfg]
    _require(not missing, f"missing config section(s) {missing}")
    optim = dict(cfg["optim"])
    if optim.get("total_steps") is None:
        optim["total_steps"] = 0
    # `gpu_mix: null` in the YAML lets a command line set a whole mapping; null means "no mix"
    sim, churn = _null_mix_as_empty(cfg["sim"]), _null_mix_as_empty(cfg["churn"])
    run = RunConfig(
        backend=_name_only(cfg["backend"], "backend", ("sim", "swarm")),
        seed=_check_type("seed", cfg["seed"], int),
        run_id=_check_type("run_id", cfg["run_id"], str),
        model=dict(cfg["model"]),
        network=build_section(NetworkConfig, cfg["network"], "network"),
        topology=build_section(TopologyConfig, cfg["topology"], "topology"),
        train=build_section(TrainConfig, cfg["train"], "train"),
        sim=build_section(SimConfig, sim, "sim"),
        optim=build_section(OptimConfig, optim, "optim"),
        data=_from_mapping(DataConfig, cfg["data"]),
        churn=_from_mapping(ChurnConfig, churn),
        compression=build_section(CompressionConfig, cfg["compression"], "compression"),
        averaging=_averaging(cfg["averaging"], cfg["train"].get("batch_size")),
        scale=build_section(ScaleConfig, cfg["scale"], "scale"),
        wandb=build_section(WandbConfig, cfg["wandb"], "wandb"),
        swarm=build_section(SwarmConfig, cfg["swarm"], "swarm"),
    )
    _one_of("optim.name", run.optim.name, ("adamw",))
    _require(
        run.train.schedule == "async" or run.topology.num_trainers == 1,
        "train.schedule=sync needs topology.num_trainers=1 (there is no barrier across trainers); "
        "use train.schedule=async with several trainers",
    )
    return run


def _null_mix_as_empty(node: Mapping[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "gpu_mix" in node and node["gpu_mix"] is None:
        node["gpu_mix"] = {}
    return node


def _from_mapping(cls: type, node: Mapping[str, Any]) -> Any:
    try:
        return cls.from_mapping(node)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _averaging(node: Mapping[str, Any], batch_size: Any) -> AveragingConfig:
    node = dict(node)
    if node.get("target_batch_size") is None:
        node["target_batch_size"] = batch_size
    return build_section(AveragingConfig, node, "averaging")
