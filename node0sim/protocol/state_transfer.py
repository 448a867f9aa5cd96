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
    """A stage's parameters and optimizer state at ``epoch``, and the donor's warm-started PowerSGD Q (if any);
    ``state`` None: the donor declined (it is serving another download), which is not a failed download."""

    epoch: int
    state: Payload | None
    queries: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.state, self.queries)


JOIN_START_FRACTION = 0.1
"""``join_waits_for_round``: a load starts once the stage's round is under this fraction of the target (Node0's
``n0/server/optim.py``, ``load_state_from_peers``)."""
JOIN_RESUME_FRACTION = 0.2
"""... and a joiner starts serving once the stage's round (a new one, as a rule) is under this fraction (same place)."""


class StateTransfer:
    """Exports this peer's stage state and loads the stage's newest state into it.

    A loaded state replaces the parameters and optimizer state (and ``powersgd``'s Q), drops the accumulated
    gradients and samples, and sets the tracker's epoch to the donor's. Downloads, failed attempts and
    declines are counted in ``stats``.
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
        self._uploading_until = -1.0
        """When this donor's last state upload ends, at its own bandwidth (``one_download_per_donor``)."""

    async def export(self) -> StateResponse:
        """This peer's parameters and optimizer state (the answer to a ``get_state`` request)."""
        if self.cfg.one_download_per_donor and self.rt.now() < self._uploading_until:
            # Node0's rpc_download_state returns an empty stream while its _state_download_lock is held; the
            # downloader logs "did not send its state" and tries the next peer, no failure (n0/server/HM_averager.py,
            # state_averager_wrap.py)
            return StateResponse(self.progress.epoch, None)
        self._uploading_until = float("inf")  # taken before the export, so a request arriving meanwhile is declined too
        response = await self.rt.compute(0.0, self.snapshot)
        self._uploading_until = self.rt.now() + response.wire_bytes() * 8 / (self.progress.bandwidth_mbps * 1e6)
        return response

    def snapshot(self) -> StateResponse:
        """This peer's state as a joiner receives it (run it on the accelerator: ``rt.compute``)."""
        queries = self.powersgd.export_queries() if self.powersgd is not None else None
        return StateResponse(self.progress.epoch, self.compute.export_state(), queries)

    async def wait_for_round_under(self, fraction: float) -> None:
        """Poll the stage every progress period until its newest round has under ``fraction`` of the target."""
        progress = self.progress
        while True:
            await progress.refresh()
            newest, now = progress.newest_epoch(), self.rt.now()
            done = sum(r.samples_at(now) for r in progress.others().values() if r.epoch == newest)
            if done < fraction * self.cfg.target_batch_size:
                return
            await self.rt.sleep(self.cfg.progress_period_s)

    async def load_state_from_peers(self, attempts: int = 3) -> bool:
        """Download the state from a peer at the stage's newest epoch (random, so joiners spread); whether one came.

        A state taken while its donor is averaging is one step old by the time it lands, so the peer
        first waits a progress period for a running round to finish, and downloads again (up to
        ``attempts`` times) if the stage moved to a newer epoch while the state was in flight.
        """
        progress = self.progress
        loaded = False
        if self.cfg.join_waits_for_round:
            await self.wait_for_round_under(JOIN_START_FRACTION)
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
            if response.state is None:
                self.stats.declined_state_downloads += 1
                continue
            await self.rt.compute(0.0, lambda: self.apply(response))
            self.stats.state_downloads += 1
            return True
        return False

    def apply(self, response: StateResponse) -> None:
        """Replace this peer's state with ``response``'s (a ValueError if it does not fit this stage)."""
        self.compute.import_state(response.state)
        if self.powersgd is not None:
            self.powersgd.import_queries(response.queries)
        self.compute.take_gradients()
        self.progress.samples = 0
        self.progress.epoch = response.epoch
