"""In-stage data parallelism: matchmaking and a butterfly all-reduce over the runtime's RPC.

Mirrors hivemind's Optimizer/DecentralizedAverager semantics (hivemind docs, "Optimizer" and
"DecentralizedAverager"): peers that reach the end of an epoch register in the DHT, the group
is everyone registered within ``matchmaking_time_s`` of the first, and the group all-reduces by
reduce-scatter then all-gather, each member owning a part of the vector proportional to its
bandwidth (or, ``part_sizes=equal``, the same part each, as Node0's all-reduces come out). A member
that vanishes costs the others at most ``averaging_timeout_s``: parts it owned fall back to each
member's local values, contributions it never sent are left out.

:class:`Averager` is the interface of an in-stage all-reduce; :class:`GroupAverager` is the
protocol's own, over the runtime's RPC (the live backend may run hivemind's instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from node0sim.protocol.messages import GATHER_PART, HEADER_BYTES, REDUCE_PART, Payload, message, payload_bytes
from node0sim.protocol.tensors import Tensor, all_finite, cat, is_tensor, same_layout, zeros_like
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

    def start(self, members: list[str]) -> None:
        """Fix the group: what non-members sent before is dropped, and what they send later is refused."""
        self.members = members
        self.contributions = {peer: part for peer, part in self.contributions.items() if peer in members}
        self.gathered = {j: part for j, part in self.gathered.items() if j < len(members) and part[0] == members[j]}

    def check(self) -> None:
        if self.members is None:
            return
        if len(self.contributions) >= len(self.members) - 1:
            self.reduced.set_result(None)
        if len(self.gathered) >= len(self.members) - 1:
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
        """A group member's contribution to the part this peer owns (refused if not finite)."""
        round_ = self._round_for_part(caller, msg.stage, msg.tag, msg.values)
        if not all_finite(msg.values):
            raise ValueError(f"all-reduce part from {caller} is not finite")
        if round_ is not None:
            round_.contributions[caller] = (msg.values, msg.weight)
            round_.check()
        return Ack()

    async def handle_gather_part(self, caller: str, msg: GatherPart) -> Ack:
        """An averaged part from its owner (a part that ``caller`` does not own is refused once the group is known)."""
        round_ = self._round_for_part(caller, msg.stage, msg.tag, msg.values)
        if round_ is not None:
            if round_.members is not None and round_.members.index(caller) != msg.part:
                raise ValueError(f"all-reduce part {msg.part} of round {msg.tag!r} from {caller}, which does not own it")
            round_.gathered[msg.part] = (caller, msg.values)
            round_.check()
        return Ack()

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
        own = vector[slice(*bounds[me])].clone()
        contributions = [(values, w) for values, w in round_.contributions.values() if same_layout(values, own)]
        total_weight = weight + sum(w for _, w in contributions)
        for values, _ in contributions:
            own += values
        own = own / total_weight if total_weight > 0 else own
        self._send_all(me, members, lambda j: (GATHER_PART, GatherPart(self.stage, tag, me, own)))
        await self._wait(round_.complete, deadline)
        contributors = 1 + sum(same_layout(values, own) for values, _ in round_.contributions.values())
        result = self._assemble(round_, me, own, vector, weight, bounds)
        del self._rounds[tag]
        self._finished.add(tag)
        return (result if total_weight > 0 and all_finite(result) else None), contributors

    @staticmethod
    def _assemble(round_: _Round, me: int, own: Tensor, vector: Tensor, weight: float, bounds: list) -> Tensor:
        parts = []
        for j, (start, end) in enumerate(bounds):
            local = vector[start:end]
            gathered = round_.gathered.get(j, (None, None))[1]
            if j == me:
                parts.append(own)
            elif same_layout(gathered, local):
                parts.append(gathered)
            else:  # the owner vanished (or sent a malformed part): keep this peer's own values for that part
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
