"""State transfer: a stage server sends its parameters and optimizer state (and PowerSGD's warm-started
Q, as Node0's ``n0/server/power_sgd_averager.py`` does), and a joiner (or a peer that fell behind)
downloads the stage's newest state from a random up-to-date peer."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.messages import GET_STATE, HEADER_BYTES, Payload, message, payload_bytes
from node0sim.protocol.powersgd import PowerSGD
from node0sim.protocol.progress import ProgressTracker
from node0sim.protocol.stage_compute import StageCompute
from node0sim.runtime import RPCError, Runtime

if TYPE_CHECKING:
    from node0sim.protocol.stage_server import ServerStats


@message
class StateRequest:
    """Ask a peer for its stage state."""

    stage: int

    def wire_bytes(self) -> int:
        return HEADER_BYTES


@message
class StateResponse:
    """A stage's parameters and optimizer state at ``epoch``, and the donor's warm-started PowerSGD Q (if any)."""

    epoch: int
    state: Payload
    queries: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.state, self.queries)


class StateTransfer:
    """Exports this peer's stage state and loads the stage's newest state into it.

    A loaded state replaces the parameters and optimizer state (and ``powersgd``'s Q), drops the accumulated
    gradients and samples, and sets the tracker's epoch to the donor's. Downloads and failed attempts are
    counted in ``stats``.
    """

    def __init__(
        self, rt: Runtime, compute: StageCompute, progress: ProgressTracker, cfg: AveragingConfig, rng: random.Random,
        stats: ServerStats, powersgd: PowerSGD | None = None,
    ):
        self.rt = rt
        self.compute = compute
        self.progress = progress
        self.cfg = cfg
        self.rng = rng
        self.stats = stats
        self.powersgd = powersgd

    async def export(self) -> StateResponse:
        """This peer's parameters and optimizer state (the answer to a ``get_state`` request)."""
        state = await self.rt.compute(0.0, self.compute.export_state)
        queries = self.powersgd.export_queries() if self.powersgd is not None else None
        return StateResponse(self.progress.epoch, state, queries)

    async def load_state_from_peers(self, attempts: int = 3) -> bool:
        """Download the state from a peer at the stage's newest epoch (random, so joiners spread); whether one came.

        A state taken while its donor is averaging is one step old by the time it lands, so the peer
        first waits a progress period for a running round to finish, and downloads again (up to
        ``attempts`` times) if the stage moved to a newer epoch while the state was in flight.
        """
        progress = self.progress
        loaded = False
        for _ in range(attempts):
            await progress.refresh()
            if progress.newest_epoch_is_averaging():
                await self.rt.sleep(self.cfg.progress_period_s)
                await progress.refresh()
            newest = progress.newest_epoch()
            if loaded and newest <= progress.epoch:
                break
            candidates = sorted(peer for peer, r in progress.others().items() if r.epoch == newest)
            self.rng.shuffle(candidates)
            loaded = await self._download_from(candidates[:3]) or loaded
        return loaded

    async def _download_from(self, donors: list[str]) -> bool:
        for donor in donors:
            try:
                response = await self.rt.call(donor, GET_STATE, StateRequest(self.compute.index), self.cfg.state_timeout_s)
            except RPCError:
                self.stats.failed_state_downloads += 1
                continue
            await self.rt.compute(0.0, lambda: self._import(response))
            self.stats.state_downloads += 1
            return True
        return False

    def _import(self, response: StateResponse) -> None:
        self.compute.import_state(response.state)
        if self.powersgd is not None:
            self.powersgd.import_queries(response.queries)
        self.compute.take_gradients()
        self.progress.samples = 0
        self.progress.epoch = response.epoch
