"""In-stage data parallelism: matchmaking and a butterfly all-reduce over the runtime's RPC.

Mirrors hivemind's Optimizer/DecentralizedAverager semantics (hivemind docs, "Optimizer" and
"DecentralizedAverager"): peers that reach the end of an epoch register in the DHT, the group
is everyone registered within ``matchmaking_time_s`` of the first, and the group all-reduces by
reduce-scatter then all-gather, each member owning a part of the vector proportional to its
bandwidth (or, ``part_sizes=equal``, the same part each, as Node0's all-reduces come out). A member
that vanishes costs the others at most ``averaging_timeout_s``: parts it owned fall back to each
member's local values, contributions it never sent are left out.

Robust averaging (:func:`bound_contributions`, :class:`GroupAverager` only): each part's owner bounds what the
members contribute to it before it averages, so that a lying member cannot take over the mean by its declared
weight or by how far its values lie from the others' (``averaging.max_weight_ratio``, ``averaging.max_distance_ratio``); parts that
are not finite are refused and their sender is left out of the rest of the round.

:class:`Averager` is the interface of an in-stage all-reduce; :class:`GroupAverager` is the
protocol's own, over the runtime's RPC (the live backend may run hivemind's instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Protocol

import torch

from node0sim.protocol.messages import GATHER_PART, HEADER_BYTES, REDUCE_PART, Payload, check_message, message, payload_bytes
from node0sim.protocol.tensors import Tensor, TensorSpec, all_finite, cat, is_tensor, same_layout, zeros_like
from node0sim.runtime import Future, RPCError, Runtime


@dataclass(frozen=True)
class AveragingConfig:
    """When and how the peers of a stage average (names follow hivemind.Optimizer where they exist).

    The defaults are sized for CPU simulations (``conf/averaging/node0.yaml``: Node0's settings).
    """

    target_batch_size: int  # samples per epoch across a stage's peers (conf: train.batch_size)
    matchmaking_time_s: float = 1.0  # peers ready within this window of the first form the group
    matchmaking_slack_s: float = 0.2  # extra wait so every member reads the same group from the DHT (> sim.dht_latency_ms)
    averaging_timeout_s: float = 60.0  # a member that vanishes costs the others at most this
    progress_period_s: float = 0.5  # how often a peer reports its progress to the DHT (< matchmaking_time_s)
    average_state_every: int = 5  # epochs between parameter averaging rounds (0: never)
    sparta_fraction: float = 0.05  # SPARTA: fraction of parameters averaged each such round (1.0: all)
    max_allowed_stale: int = 5  # epochs behind before a peer downloads the state from another
    state_timeout_s: float = 600.0  # time allowed for one state download
    powersgd_rank: int = 0  # PowerSGD rank for gradient averaging (0: plain all-reduce)
    max_concurrent_sends: int = 4  # all-reduce parts in flight per member (bounded, like a butterfly schedule)
    # ---- variants (today's defaults; conf/averaging/node0.yaml selects Node0's) ----
    part_sizes: str = "bandwidth"  # all-reduce part of each member: bandwidth (proportional to it, hivemind) or equal
    powersgd_warm_start: bool = False  # keep Q across rounds and ship it to joiners (node0sim/protocol/powersgd.py)
    powersgd_skip_tail: bool = False  # the tail stage averages its gradients uncompressed
    state_averaging: str = "random"  # random: a fresh random sparta_fraction each round, parameters only (SPARTA);
    # partition: a fixed partition into ceil(1 / sparta_fraction) parts, one per round in turn, optimizer state too
    blocks_serving: bool = False  # no backward runs while the stage averages and steps (Node0's optimizer lock)
    auto_step_s: float = 0.0  # an idle peer checks whether its epoch is due at least this often (0: every progress period)
    join_waits_for_round: bool = False  # a state load waits until the stage's round is under 10% done; a joiner then waits for <20%
    one_download_per_donor: bool = False  # a donor refuses a state request while its upload of another one lasts
    # ---- watchdog: the peer exits (and leaves the stage) after ... (0 / false: never) ----
    watchdog_failed_rounds: int = 0  # ... this many failed all-reduces (gradient or state) in a row
    watchdog_failed_state_loads: int = 0  # ... this many state loads that got no state
    watchdog_nan_gradients: bool = False  # ... accumulating gradients that are not finite
    # ---- robust averaging (GroupAverager: swarm.all_reduce=protocol and the simulator; bound_contributions) ----
    max_weight_ratio: float = 16.0  # a declared weight counts at most this many times the part's lower-median weight (0: any);
    # peers accumulate samples in proportion to their throughput, and the fastest GPU profile over the slowest is
    # 989 / 65 = 15.2 (H100 over T4, bf16 peaks, node0sim/sim/gpus.py), so an honest ratio stays under 16
    max_distance_ratio: float = 0.0  # a member's per-sample part counts at most this many times the lower-median distance
    # from the coordinate-wise median (0: any; off by default: an honest part can be several times further, e.g. a noisy
    # few-sample gradient or a peer an epoch behind)

    def __post_init__(self) -> None:
        if self.target_batch_size < 1:
            raise ValueError(f"averaging.target_batch_size: must be >= 1, got {self.target_batch_size}")
        if not 0 < self.sparta_fraction <= 1:
            raise ValueError(f"averaging.sparta_fraction: must be in (0, 1], got {self.sparta_fraction}")
        for name in ("matchmaking_time_s", "matchmaking_slack_s", "averaging_timeout_s", "progress_period_s", "state_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"averaging.{name}: must be > 0, got {getattr(self, name)}")
        if self.max_concurrent_sends < 1:
            raise ValueError(f"averaging.max_concurrent_sends: must be >= 1, got {self.max_concurrent_sends}")
        if self.average_state_every < 0 or self.max_allowed_stale < 0 or self.powersgd_rank < 0:
            raise ValueError("averaging.average_state_every, max_allowed_stale and powersgd_rank must be >= 0")
        for name, allowed in (("part_sizes", PART_SIZES), ("state_averaging", STATE_AVERAGING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"averaging.{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("auto_step_s", "watchdog_failed_rounds", "watchdog_failed_state_loads"):
            if getattr(self, name) < 0:
                raise ValueError(f"averaging.{name}: must be >= 0 (0: off), got {getattr(self, name)}")
        for name in ("max_weight_ratio", "max_distance_ratio"):
            value = getattr(self, name)
            if not (value == 0 or 1 <= value < math.inf):
                raise ValueError(f"averaging.{name}: must be 0 (unbounded) or a finite ratio >= 1 (the median itself "
                                 f"is never clipped), got {value}")

    def part_shares(self, bandwidths: list[float]) -> list[float]:
        """What each member's all-reduce part is proportional to: its bandwidth, or 1 (``part_sizes=equal``)."""
        return list(bandwidths) if self.part_sizes == "bandwidth" else [1.0] * len(bandwidths)

    @property
    def num_partitions(self) -> int:
        """Parts of the fixed partition that ``state_averaging=partition`` cycles through (Node0: ceil(1 / p))."""
        return math.ceil(1 / self.sparta_fraction - 1e-9)


PART_SIZES = ("bandwidth", "equal")
STATE_AVERAGING = ("random", "partition")


def group_key(run_id: str, stage: int, epoch: int) -> str:
    """DHT key where the peers of ``stage`` that finished ``epoch`` register for averaging."""
    return f"{run_id}/group/{stage}/{epoch}"


class Averager(Protocol):
    """One peer's side of the in-stage all-reduces of a stage (what :class:`StageServer` averages with).

    Bad parts, the same rule in every implementation, so that a faulty or hostile member costs at most
    its own contribution and no caller ever steps with non-finite values:

    - a peer whose own ``vector`` is not finite takes part with zeros and weight 0 (it adds nothing and
      receives the others' mean);
    - a contribution from another member that is not finite (or not of the part's shape and dtype) is
      refused by the part's owner and left out of that part's average together with its weight, as if
      the member had not sent it;
    - when the assembled mean is not finite (an owner sent a non-finite averaged part) or the weights
      of the part this peer averaged add up to 0, :meth:`all_reduce` returns ``(None, contributors)``.

    :class:`GroupAverager` goes further (robust averaging): it also refuses a non-finite averaged part (that
    part keeps this peer's own values, as when its owner vanished) and bounds every contribution
    (:func:`bound_contributions`); hivemind's runner (``swarm/allreduce.py``) does neither.
    """

    timeouts: int
    """Rounds in which some member's part did not arrive in time (or the round failed as a whole)."""

    def serve(self) -> None:
        """Start accepting this peer's share of all-reduce traffic (before its first round)."""

    async def all_reduce(
        self, tag: str, members: list[str], bandwidths: list[float], vector: Tensor, weight: float
    ) -> tuple[Tensor | None, int]:
        """Weighted average ``sum(vector_i) / sum(weight_i)`` over ``members`` (sorted peer ids, this peer
        among them; ``vector`` is this peer's weighted sum, a flat tensor or spec; ``bandwidths`` set each
        member's share of the work). Every member calls it with the same ``tag`` (unique per round).

        Returns ``(mean, contributors)``: ``contributors`` counts this peer and the members whose
        contribution to this peer's part arrived and was not refused. A member that vanishes costs the
        others at most ``averaging_timeout_s``; parts it should have averaged keep this peer's own values.
        ``mean`` is ``None`` as the bad-parts rule says.
        """


AveragerFactory = Callable[[Runtime, int, AveragingConfig], Averager]
"""``factory(rt, stage, cfg)``: the averager of one peer of ``stage``."""


@message
class ReducePart:
    """Reduce-scatter: the sender's weighted sum for the part owned by the receiver."""

    stage: int
    tag: str
    values: Payload
    weight: float

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.values)


@message
class GatherPart:
    """All-gather: the averaged part ``part`` from its owner."""

    stage: int
    tag: str
    part: int
    values: Payload

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.values)


@message
class Ack:
    """Receipt of a part."""

    def wire_bytes(self) -> int:
        return HEADER_BYTES


def part_bounds(length: int, bandwidths: list[float]) -> list[tuple[int, int]]:
    """Split ``length`` values into contiguous parts proportional to each member's bandwidth."""
    total = sum(bandwidths)
    bounds, start, acc = [], 0, 0.0
    for i, bandwidth in enumerate(bandwidths):
        acc += bandwidth
        end = length if i == len(bandwidths) - 1 else round(length * acc / total)
        bounds.append((start, end))
        start = end
    return bounds


def lower_median(values: list[float]) -> float:
    """The middle value of ``values`` (of an even count, the lower of the two middle ones: of two, the smaller)."""
    return sorted(values)[(len(values) - 1) // 2]


def _norm(values: torch.Tensor) -> float:
    """Euclidean norm of a part, in float64 so that large finite values do not overflow."""
    return torch.linalg.vector_norm(values, dtype=torch.float64).item()


def _center_and_distances(parts: list[tuple[Tensor, float]], max_distance_ratio: float) -> tuple[Tensor | None, list[float], float]:
    """For the distance bound: the coordinate-wise (lower) median of the per-sample parts of the members with a positive
    weight, each member's distance to it, and the radius ``max_distance_ratio x lower_median(distances)``; ``(None, zeros,
    inf)`` where the bound does not apply (off, timing mode, an empty part, fewer than 3 members with a positive weight)."""
    positive = [values / weight for values, weight in parts if weight > 0]
    if not max_distance_ratio or isinstance(parts[0][0], TensorSpec) or parts[0][0].numel() == 0 or len(positive) < 3:
        return None, [0.0] * len(parts), math.inf
    center = torch.stack(positive).median(dim=0).values
    distances = [_norm(values / weight - center) if weight > 0 else 0.0 for values, weight in parts]
    return center, distances, max_distance_ratio * lower_median([d for d, (_, w) in zip(distances, parts) if w > 0])


def bound_contributions(parts: list[tuple[Tensor, float]], cfg: AveragingConfig) -> tuple[list[tuple[Tensor, float]], int]:
    """The robust rule a part's owner applies before it averages: ``parts`` are the members' ``(v, w)`` for the part
    (weighted sum, declared weight; this peer's first), returned bounded, in order, with how many were clipped.

    - A weight is clipped to ``W = max_weight_ratio x lower_median(positive weights)``: ``w' = min(w, W)``, the
      member's per-sample part ``x = v / w`` kept (``v' = w' x``).
    - With ``max_distance_ratio`` (numerics mode, 3 or more members with a positive weight), ``x`` is clipped to a distance
      of at most ``R = max_distance_ratio x lower_median(|x_i - c|)`` from the coordinate-wise median ``c`` of the members'
      ``x_i``: ``x' = c + (x - c) min(1, R / |x - c|)``, ``v' = w' x'``. This is centered clipping (Karimireddy, He &
      Jaggi, ICML 2021, "Learning from History for Byzantine Robust Optimization") with a median-based radius, centered
      at the coordinate-wise median (Yin et al., ICML 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
      Statistical Rates") instead of the last aggregate, as a round keeps no history.
    - A part of weight 0 adds nothing: its values are replaced by zeros (an honest one sends zeros).

    Both bounds use the median, so with 3 or more members and an honest majority the liar is bounded by honest values.
    Of 2 members a median cannot tell who lies: the weight bound (the lower median of two is the smaller value) bounds
    each by ``max_weight_ratio`` times the other, so a liar's share of the weight is at most
    ``max_weight_ratio / (max_weight_ratio + 1)``, and the distance bound clips nobody. A part within both bounds is
    returned as it came, so a round where nobody exceeds them gives exactly the plain weighted mean.
    """
    weights = [w for _, w in parts if w > 0]
    if not weights:
        return [(zeros_like(v), 0.0) for v, _ in parts], 0
    weight_bound = cfg.max_weight_ratio * lower_median(weights) if cfg.max_weight_ratio else math.inf
    center, distances, radius = _center_and_distances(parts, cfg.max_distance_ratio)
    bounded, clipped = [], 0
    for (values, weight), distance in zip(parts, distances):
        if weight <= 0:
            bounded.append((zeros_like(values), 0.0))
            continue
        if weight <= weight_bound and distance <= radius:
            bounded.append((values, weight))
            continue
        clipped_weight = min(weight, weight_bound)
        if distance > radius:
            per_sample = center + (values / weight - center) * (radius / distance)
            bounded.append((per_sample * clipped_weight, clipped_weight))
        else:
            bounded.append((values * (clipped_weight / weight), clipped_weight))
        clipped += 1
    return bounded, clipped


MAX_EARLY_ROUNDS = 4
"""Rounds this peer keeps parts for before it has started them itself (a member may be ahead by a round or two:
its gradient and state rounds of the same epoch); parts of further unknown rounds are refused."""


@dataclass
class _Round:
    """What one all-reduce (identified by its tag) has received so far; ``members`` once this peer started it."""

    created: float
    contributions: dict[str, tuple[Tensor, float]] = field(default_factory=dict)
    gathered: dict[int, tuple[str, Tensor]] = field(default_factory=dict)  # part -> (its sender, the averaged values)
    members: list[str] | None = None
    reduced: Future | None = None
    complete: Future | None = None
    refused: set[str] = field(default_factory=set)
    """Members a part of which was refused (not finite): left out of the rest of the round, not waited for."""

    def start(self, members: list[str]) -> None:
        """Fix the group: what non-members sent before is dropped, and what they send later is refused."""
        self.members = members
        self.contributions = {peer: part for peer, part in self.contributions.items() if peer in members}
        self.gathered = {j: part for j, part in self.gathered.items() if j < len(members) and part[0] == members[j]}
        self.refused = {peer for peer in self.refused if peer in members}

    def check(self) -> None:
        if self.members is None:
            return
        others = len(self.members) - 1
        if len(self.contributions.keys() | self.refused) >= others:
            self.reduced.set_result(None)
        if len({sender for sender, _ in self.gathered.values()} | self.refused) >= others:
            self.complete.set_result(None)


class GroupAverager(Averager):
    """The protocol's :class:`Averager`: serves incoming parts and runs its own rounds over the runtime's RPC."""

    def __init__(self, rt: Runtime, stage: int, cfg: AveragingConfig):
        self.rt = rt
        self.stage = stage
        self.cfg = cfg
        self._rounds: dict[str, _Round] = {}
        self._finished: set[str] = set()
        self.timeouts = 0
        self.refused_parts = 0
        """Parts refused as not finite (or of a weight that is negative or not finite): each excluded its sender."""
        self.clipped_parts = 0
        """Contributions to this peer's parts whose weight or distance :func:`bound_contributions` clipped."""

    def serve(self) -> None:
        """Register the all-reduce handlers on this peer."""
        self.rt.serve(REDUCE_PART, self.handle_reduce_part)
        self.rt.serve(GATHER_PART, self.handle_gather_part)

    def _round(self, tag: str) -> _Round:
        if tag not in self._rounds:
            self._rounds[tag] = _Round(self.rt.now(), reduced=self.rt.future(), complete=self.rt.future())
        return self._rounds[tag]

    def _round_for_part(self, caller: str, stage: int, tag: str, values: Any) -> _Round | None:
        """The round a part from ``caller`` belongs to (None: the round is over); refuses what cannot be one of its parts."""
        if stage != self.stage:
            raise ValueError(f"all-reduce part for stage {stage} sent to a peer of stage {self.stage}")
        if not is_tensor(values) or values.dim() != 1:
            raise ValueError(f"all-reduce part from {caller} is not a flat tensor")
        if tag in self._finished:
            return None
        if tag in self._rounds:
            round_ = self._rounds[tag]
            if round_.members is not None and caller not in round_.members:
                raise ValueError(f"all-reduce part from {caller}, not a member of round {tag!r}")
            return round_
        early = [t for t, r in self._rounds.items() if r.members is None]
        if len(early) >= MAX_EARLY_ROUNDS:
            raise ValueError(f"all-reduce part from {caller} for round {tag!r}: {len(early)} rounds this peer has not "
                             f"started hold parts already (at most {MAX_EARLY_ROUNDS})")
        return self._round(tag)

    async def handle_reduce_part(self, caller: str, msg: ReducePart) -> Ack:
        """A group member's contribution to the part this peer owns (refused if not finite, or if its weight is
        negative or not finite: the sender is then left out of the round)."""
        check_message(msg, ReducePart)
        round_ = self._round_for_part(caller, msg.stage, msg.tag, msg.values)
        if not all_finite(msg.values):
            self._refuse(round_, caller, "is not finite")
        if not (math.isfinite(msg.weight) and msg.weight >= 0):
            self._refuse(round_, caller, f"has weight {msg.weight} (must be finite and >= 0)")
        if round_ is not None:
            self._check_not_refused(round_, caller, msg.tag)
            round_.contributions[caller] = (msg.values, msg.weight)
            round_.check()
        return Ack()

    async def handle_gather_part(self, caller: str, msg: GatherPart) -> Ack:
        """An averaged part from its owner (a part that ``caller`` does not own is refused once the group is known; one
        that is not finite is refused and the part keeps this peer's own values)."""
        check_message(msg, GatherPart)
        round_ = self._round_for_part(caller, msg.stage, msg.tag, msg.values)
        if round_ is not None and round_.members is not None and round_.members.index(caller) != msg.part:
            raise ValueError(f"all-reduce part {msg.part} of round {msg.tag!r} from {caller}, which does not own it")
        if not all_finite(msg.values):
            self._refuse(round_, caller, "is not finite")
        if round_ is not None:
            self._check_not_refused(round_, caller, msg.tag)
            round_.gathered[msg.part] = (caller, msg.values)
            round_.check()
        return Ack()

    def _refuse(self, round_: _Round | None, caller: str, problem: str) -> NoReturn:
        """Refuse a bad part: its sender is left out of the rest of the round (and not waited for)."""
        self.refused_parts += 1
        if round_ is not None:
            round_.refused.add(caller)
            round_.check()
        raise ValueError(f"all-reduce part from {caller} {problem}")

    @staticmethod
    def _check_not_refused(round_: _Round, caller: str, tag: str) -> None:
        if caller in round_.refused:
            raise ValueError(f"all-reduce part from {caller}: a part of it was refused earlier in round {tag!r}")

    def _drop_stale_rounds(self) -> None:
        """Forget parts of rounds this peer never started within ``averaging_timeout_s`` (their group went on without it)."""
        now = self.rt.now()
        for tag in [t for t, r in self._rounds.items() if r.members is None and now - r.created > self.cfg.averaging_timeout_s]:
            del self._rounds[tag]

    async def all_reduce(
        self, tag: str, members: list[str], bandwidths: list[float], vector: Tensor, weight: float
    ) -> tuple[Tensor | None, int]:
        if not all_finite(vector):
            vector, weight = zeros_like(vector), 0.0
        return await self._all_reduce(tag, members, bandwidths, vector, weight)

    async def _all_reduce(
        self, tag: str, members: list[str], bandwidths: list[float], vector: Tensor, weight: float
    ) -> tuple[Tensor | None, int]:
        me = members.index(self.rt.peer_id)
        bounds = part_bounds(vector.numel(), self.cfg.part_shares(bandwidths))
        # reduce-scatter gets the first half of the time budget, so that owners' averaged parts
        # still reach everyone before the all-gather deadline when some member is missing
        started = self.rt.now()
        reduce_deadline = started + self.cfg.averaging_timeout_s / 2
        deadline = started + self.cfg.averaging_timeout_s
        self._drop_stale_rounds()
        round_ = self._round(tag)
        round_.start(members)
        self._send_all(me, members, lambda j: (REDUCE_PART, ReducePart(self.stage, tag, vector[slice(*bounds[j])], weight)))
        round_.check()
        await self._wait(round_.reduced, reduce_deadline)
        own = vector[slice(*bounds[me])]
        arrived = [part for peer, part in round_.contributions.items() if peer not in round_.refused and same_layout(part[0], own)]
        (own, own_weight), *contributions = self._bounded([(own, weight), *arrived])
        own = own.clone()
        total_weight = own_weight + sum(w for _, w in contributions)
        for values, _ in contributions:
            own += values
        own = own / total_weight if total_weight > 0 else own
        self._send_all(me, members, lambda j: (GATHER_PART, GatherPart(self.stage, tag, me, own)))
        await self._wait(round_.complete, deadline)
        contributors = 1 + sum(peer not in round_.refused and same_layout(values, own)
                               for peer, (values, _) in round_.contributions.items())
        result = self._assemble(round_, me, own, vector, weight, bounds)
        del self._rounds[tag]
        self._finished.add(tag)
        return (result if total_weight > 0 and all_finite(result) else None), contributors

    def _bounded(self, parts: list[tuple[Tensor, float]]) -> list[tuple[Tensor, float]]:
        bounded, clipped = bound_contributions(parts, self.cfg)
        self.clipped_parts += clipped
        return bounded

    @staticmethod
    def _assemble(round_: _Round, me: int, own: Tensor, vector: Tensor, weight: float, bounds: list) -> Tensor:
        parts = []
        for j, (start, end) in enumerate(bounds):
            local = vector[start:end]
            sender, gathered = round_.gathered.get(j, (None, None))
            if j == me:
                parts.append(own)
            elif same_layout(gathered, local) and sender not in round_.refused:
                parts.append(gathered)
            else:  # the owner vanished (or sent a malformed part, or was refused): keep this peer's own values for that part
                parts.append(local / weight if weight > 0 else local)
        return cat(parts)

    async def _wait(self, future: Future, deadline: float) -> None:
        try:
            await future.wait(timeout=max(0.0, deadline - self.rt.now()))
        except TimeoutError:
            self.timeouts += 1

    def _send_all(self, me: int, members: list[str], message_for: Any) -> None:
        """Send ``message_for(j)`` to every other member, at most ``max_concurrent_sends`` at a time.

        Receivers are visited in rotated order (member i starts with i+1), so at any moment the
        members send to different peers, as in a butterfly exchange.
        """
        order = [(me + step) % len(members) for step in range(1, len(members))]
        lanes = min(self.cfg.max_concurrent_sends, len(order))
        for lane in range(lanes):
            self.rt.spawn(self._send_in_turn([(members[j], *message_for(j)) for j in order[lane::lanes]]))

    async def _send_in_turn(self, sends: list[tuple[str, str, Any]]) -> None:
        for peer, method, request in sends:
            try:
                await self.rt.call(peer, method, request, timeout=self.cfg.averaging_timeout_s)
            except RPCError:
                pass  # the receiver is gone: it will not wait for us either
