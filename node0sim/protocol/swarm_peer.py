"""A volunteer peer's life in the swarm: pick the weakest stage (or be told it by the organizer, as in Node0), serve it,
move when it pays off."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from node0sim.protocol.balancing import choose_stage, should_move, stage_throughputs
from node0sim.protocol.messages import HEADER_BYTES, check_message, message
from node0sim.protocol.progress import read_stages
from node0sim.protocol.stage_server import StageServer
from node0sim.runtime import RPCError, Runtime

ASSIGN_STAGE = "assign_stage"
ASSIGNMENT_TIMEOUT_S = 30.0
"""How long a joiner waits for the organizer's answer before it picks its stage itself."""


@dataclass(frozen=True)
class BalanceConfig:
    """Petals-style balancing: check every ``rebalance_period_s`` (0: never), move if the bottleneck
    improves by at least ``rebalance_margin`` (a fraction: hysteresis against oscillation)."""

    rebalance_period_s: float = 300.0
    rebalance_margin: float = 0.2

    def __post_init__(self) -> None:
        if self.rebalance_period_s < 0 or self.rebalance_margin < 0:
            raise ValueError("topology.rebalance_period_s and topology.rebalance_margin must be >= 0")


@message
class StageRequest:
    """A joiner asks the organizer which stage to serve."""

    throughput: float

    def wire_bytes(self) -> int:
        return HEADER_BYTES


@message
class StageAssignment:
    """The organizer's answer: the stage to serve."""

    stage: int

    def wire_bytes(self) -> int:
        return HEADER_BYTES


class StageOrganizer:
    """Central stage assignment (``topology.stage_assignment=central``): Node0's authorization server names a
    joiner's stage (``n0/security/authorization.py``: ``stage_type`` in its reply). Its rule is not public; here it
    is the decentralized one (the weakest stage by announced throughput), applied by one peer to the DHT's
    records, so both give the same stage for the same swarm state. Where they differ: the organizer also counts
    the joiners it assigned that have not announced yet (for up to ``pending_s``), so peers that join at the same
    moment spread over the stages instead of all picking the one that looked weakest."""

    def __init__(self, rt: Runtime, run_id: str, num_stages: int, pending_s: float):
        self.rt = rt
        self.run_id = run_id
        self.num_stages = num_stages
        self.pending_s = pending_s
        self.assigned = 0
        self._pending: dict[str, tuple[int, float, float]] = {}  # joiner -> (stage, throughput, when assigned)

    def serve(self) -> None:
        """Answer joiners' stage requests."""
        self.rt.serve(ASSIGN_STAGE, self.handle_assign_stage)

    async def handle_assign_stage(self, caller: str, request: StageRequest) -> StageAssignment:
        """The stage ``caller`` should serve."""
        check_message(request, StageRequest)
        if not request.throughput > 0:
            raise ValueError(f"a stage request needs a throughput > 0, got {request.throughput}")
        announced = {stage: {peer: r.throughput for peer, r in records.items()}
                     for stage, records in enumerate(await read_stages(self.rt, self.run_id, self.num_stages))}
        self._pending.pop(caller, None)
        visible = set().union(*announced.values())
        self._pending = {peer: pending for peer, pending in self._pending.items()
                         if peer not in visible and self.rt.now() - pending[2] < self.pending_s}
        for peer, (stage, throughput, _) in self._pending.items():
            announced[stage][peer] = throughput
        stage = choose_stage(stage_throughputs(announced, self.num_stages), request.throughput)
        self._pending[caller] = (stage, request.throughput, self.rt.now())
        self.assigned += 1
        return StageAssignment(stage)


async def stage_throughputs_from_dht(rt: Runtime, run_id: str, num_stages: int) -> list[float]:
    """Total announced throughput of every stage, read from the stages' DHT records."""
    stages = await read_stages(rt, run_id, num_stages)
    announced = {stage: {peer: r.throughput for peer, r in records.items()} for stage, records in enumerate(stages)}
    return stage_throughputs(announced, num_stages)


class SwarmPeer:
    """Serves one stage at a time; ``make_server(stage)`` builds the server (and its weights) for a stage."""

    def __init__(
        self,
        rt: Runtime,
        run_id: str,
        num_stages: int,
        throughput: float,
        make_server: Callable[[int], StageServer],
        balance: BalanceConfig,
        organizer: str | None = None,
    ):
        """``organizer``: the peer that names this peer's stage when it joins (central assignment); None: it picks."""
        self.rt = rt
        self.run_id = run_id
        self.num_stages = num_stages
        self.throughput = throughput
        self.make_server = make_server
        self.balance = balance
        self.organizer = organizer
        self.server: StageServer | None = None
        self.named_by_organizer = False
        """Whether the organizer named the stage this peer joined (central assignment that got an answer)."""
        self.moves = 0
        self._rng = random.Random(rt.peer_id)

    @property
    def stage(self) -> int | None:
        """The stage this peer serves now (None before it starts, and after its watchdog made it exit)."""
        return None if self.server is None or self.server.exited else self.server.stage

    async def run(self, stage: int | None = None, load_state: bool = True) -> None:
        """Join (at ``stage``, or the one the organizer names, or the weakest one), then keep checking whether to move."""
        if stage is None:
            stage = await self._assigned_stage()
        await self._serve(stage, load_state)
        if not self.balance.rebalance_period_s:
            return
        while True:
            # jittered, so peers of a stage do not all decide at the same moment
            await self.rt.sleep(self.balance.rebalance_period_s * self._rng.uniform(0.5, 1.5))
            if self.server.exited:
                return  # the watchdog ended this peer
            throughputs = await stage_throughputs_from_dht(self.rt, self.run_id, self.num_stages)
            target = should_move(throughputs, self.server.stage, self.throughput, self.balance.rebalance_margin)
            if target is not None:
                await self.server.leave()
                self.moves += 1
                await self._serve(target, load_state=True)

    async def _assigned_stage(self) -> int:
        """The organizer's choice; the own choice without an organizer, or when the organizer does not answer."""
        if self.organizer is not None:
            try:
                answer = await self.rt.call(self.organizer, ASSIGN_STAGE, StageRequest(self.throughput), ASSIGNMENT_TIMEOUT_S)
                if isinstance(answer, StageAssignment) and 0 <= answer.stage < self.num_stages:
                    self.named_by_organizer = True
                    return answer.stage
            except RPCError:
                pass
        return choose_stage(await stage_throughputs_from_dht(self.rt, self.run_id, self.num_stages), self.throughput)

    async def _serve(self, stage: int, load_state: bool) -> None:
        self.server = self.make_server(stage)
        await self.server.start(load_state=load_state)

    async def leave(self) -> None:
        """Graceful departure."""
        if self.server is not None:
            await self.server.leave()
