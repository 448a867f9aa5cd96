"""A volunteer peer's life in the swarm: pick the weakest stage, serve it, move when it pays off."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from node0sim.protocol.balancing import choose_stage, should_move, stage_throughputs
from node0sim.protocol.progress import read_stages
from node0sim.protocol.stage_server import StageServer
from node0sim.runtime import Runtime


@dataclass(frozen=True)
class BalanceConfig:
    """Petals-style balancing: check every ``rebalance_period_s`` (0: never), move if the bottleneck
    improves by at least ``rebalance_margin`` (a fraction: hysteresis against oscillation)."""

    rebalance_period_s: float = 300.0
    rebalance_margin: float = 0.2

    def __post_init__(self) -> None:
        if self.rebalance_period_s < 0 or self.rebalance_margin < 0:
            raise ValueError("topology.rebalance_period_s and topology.rebalance_margin must be >= 0")


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
    ):
        self.rt = rt
        self.run_id = run_id
        self.num_stages = num_stages
        self.throughput = throughput
        self.make_server = make_server
        self.balance = balance
        self.server: StageServer | None = None
        self.moves = 0
        self._rng = random.Random(rt.peer_id)

    @property
    def stage(self) -> int | None:
        """The stage this peer serves now (None before it starts, and after its watchdog made it exit)."""
        return None if self.server is None or self.server.exited else self.server.stage

    async def run(self, stage: int | None = None, load_state: bool = True) -> None:
        """Join (at ``stage``, or the weakest one), then keep checking whether to move."""
        if stage is None:
            stage = choose_stage(await stage_throughputs_from_dht(self.rt, self.run_id, self.num_stages), self.throughput)
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

    async def _serve(self, stage: int, load_state: bool) -> None:
        self.server = self.make_server(stage)
        await self.server.start(load_state=load_state)

    async def leave(self) -> None:
        """Graceful departure."""
        if self.server is not None:
            await self.server.leave()
