"""Progress tracking: each stage server's typed record in the DHT, and what a stage's records say.

Every server of a stage stores a :class:`StageRecord` under ``stage_key(run_id, stage)`` (one
subkey per peer), as hivemind's ProgressTracker reports local progress. On the wire the record is a
plain dict (msgpack-able for the live DHT); every reader goes through :meth:`StageRecord.from_dht`,
so a malformed record is dropped, never a crash of the role that reads it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from node0sim.protocol.averaging import AveragingConfig
from node0sim.runtime import Runtime


def stage_key(run_id: str, stage: int) -> str:
    """DHT key under which the servers of ``stage`` report themselves (one subkey per peer)."""
    return f"{run_id}/stage/{stage}"


_MAX_INT = 2**53
"""Larger integers are not exactly floats (and past ~1e308 not floats at all: arithmetic with them raises)."""


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite float or an int exactly representable as one (bools are not numbers)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_INT


@dataclass(frozen=True, slots=True)
class StageRecord:
    """What one server of a stage announces about itself."""

    epoch: int
    samples: int
    """Samples accumulated toward ``epoch`` when the record was made."""
    rate: float
    """Samples per second it has been accumulating lately (an exponential average)."""
    time: float
    """When the record was made (the reporter's clock)."""
    throughput: float
    """Samples per second it can serve (what trainers route by and balancing sums)."""
    bandwidth: float
    """Its upload bandwidth (Mb/s)."""
    ready: bool
    """Whether it serves (False while a joiner downloads its state)."""
    averaging: int | None
    """The epoch it is ending (matchmaking, averaging, stepping) right now; None when it is not."""

    def to_dht(self) -> dict[str, Any]:
        """The value stored in the DHT: a plain dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dht(cls, value: Any) -> StageRecord | None:
        """The record stored as ``value``; None (never an exception) if it is not exactly a well-formed record."""
        if not isinstance(value, dict) or value.keys() != _FIELDS:
            return None
        counts = (value["epoch"], value["samples"])
        numbers = (value["rate"], value["time"], value["throughput"], value["bandwidth"])
        averaging = value["averaging"]
        if not (all(map(_is_count, counts)) and all(map(is_finite_number, numbers)) and isinstance(value["ready"], bool)):
            return None
        if averaging is not None and not _is_count(averaging):
            return None
        return cls(**value)

    def samples_at(self, now: float) -> float:
        """Samples it has accumulated by ``now``, extrapolated at its rate."""
        return self.samples + self.rate * (now - self.time)


_FIELDS = StageRecord.__dataclass_fields__.keys()

_PARSED_LIMIT = 1 << 14
_parsed: dict[int, tuple[Any, StageRecord | None]] = {}
"""``from_dht`` of values read before, by ``id``; each entry holds its value, so the id cannot be reused
while it is there. In the simulator every reader gets the object its writer stored, so a record is
parsed once, not once per reader and read (the live DHT hands out fresh copies: they miss)."""


_parsed_stages: dict[int, tuple[Any, dict[str, StageRecord]]] = {}
"""``parse_stage`` of stage values read before, by ``id`` (as ``_parsed``)."""


def _record_of(value: Any) -> StageRecord | None:
    """``StageRecord.from_dht(value)``, remembered for this very object (DHT values are never changed in place)."""
    seen = _parsed.get(id(value))
    if seen is not None and seen[0] is value:
        return seen[1]
    if len(_parsed) >= _PARSED_LIMIT:
        _parsed.clear()
    record = StageRecord.from_dht(value)
    _parsed[id(value)] = (value, record)
    return record


def parse_stage(value: Any) -> dict[str, StageRecord]:
    """The well-formed records in a stage key's DHT value (a ``{peer: record}`` dict), in its order (read-only: the
    simulator's DHT hands every reader the same value while nothing changed, and this gives them the same answer)."""
    if not isinstance(value, dict):
        return {}
    seen = _parsed_stages.get(id(value))
    if seen is not None and seen[0] is value:
        return seen[1]
    if len(_parsed_stages) >= _PARSED_LIMIT:
        _parsed_stages.clear()
    records = {peer: _record_of(record) for peer, record in value.items()}
    parsed = {peer: record for peer, record in records.items() if record is not None}
    _parsed_stages[id(value)] = (value, parsed)
    return parsed


async def read_stage(rt: Runtime, run_id: str, stage: int) -> dict[str, StageRecord]:
    """The stage's well-formed records, read now (one DHT get)."""
    return parse_stage(await rt.dht_get(stage_key(run_id, stage)))


async def read_stages(rt: Runtime, run_id: str, num_stages: int) -> list[dict[str, StageRecord]]:
    """Every stage's well-formed records, read concurrently (one DHT get per stage)."""
    lookups = [rt.spawn(rt.dht_get(stage_key(run_id, stage))) for stage in range(num_stages)]
    return [parse_stage(value) for value in await rt.gather(lookups)]


class ProgressTracker:
    """This server's progress in its stage, and the stage's records as last read.

    The server sets the local progress (``epoch``, ``samples`` accumulated toward it, ``ready``,
    ``ending_epoch``) and counts samples with :meth:`count`; :meth:`report` publishes it with a rate
    estimate, valid for three progress periods. :meth:`refresh` re-reads the stage; every question
    is answered from that read, about the stage's *other ready* peers (joiners still downloading and
    this peer itself are left out), without touching the DHT.
    """

    def __init__(self, rt: Runtime, run_id: str, stage: int, cfg: AveragingConfig, *, throughput: float, bandwidth_mbps: float):
        self.rt = rt
        self.key = stage_key(run_id, stage)
        self.cfg = cfg
        self.throughput = throughput
        self.bandwidth_mbps = bandwidth_mbps
        self.epoch = 0
        self.samples = 0
        self.ready = False
        self.ending_epoch: int | None = None
        """The epoch this peer is ending (averaging), None between rounds; published as the record's ``averaging`` until the
        epoch advances (then the round is over, though its state averaging and last report may still run)."""
        self.records: dict[str, StageRecord] = {}
        """The stage's records as last read (this peer's own included)."""
        self._others: dict[str, StageRecord] = {}
        self._rate = 0.0
        self._last_report_time = 0.0
        self._since_report = 0
        self._stored = False
        self._last_seen: dict[str, float] = {}
        """When each other ready peer was last in a read (this peer's clock), for those seen within a record's lifetime."""
        self.stale_reads = 0
        """Reads of the stage that missed this peer's own record and were ignored (see :meth:`refresh`)."""

    # ---- this peer -------------------------------------------------------------------------
    def count(self, samples: int) -> None:
        """``samples`` more were accumulated toward this epoch."""
        self.samples += samples
        self._since_report += samples

    async def report(self) -> None:
        """Store this peer's record (the rate: half the last estimate, half the rate since the last report)."""
        now = self.rt.now()
        if now > self._last_report_time:
            self._rate = 0.5 * self._rate + 0.5 * self._since_report / (now - self._last_report_time)
        self._last_report_time, self._since_report = now, 0
        record = StageRecord(
            self.epoch, self.samples, self._rate, now, self.throughput, self.bandwidth_mbps, self.ready,
            self.ending_epoch if self.ending_epoch == self.epoch else None,  # a round past its epoch is over
        )
        await self.rt.dht_store(self.key, record.to_dht(), expires_in=self.record_lifetime_s, per_peer=True)
        self._stored = True

    async def keep_reporting(self) -> None:
        """Report every progress period, forever (also while the server is busy averaging or downloading)."""
        while True:
            await self.rt.sleep(self.cfg.progress_period_s)
            await self.report()

    async def withdraw(self) -> None:
        """Remove this peer's record, so the stage's others stop counting on it."""
        self._stored = False
        await self.rt.dht_store(self.key, None, expires_in=0.0, per_peer=True)

    # ---- the stage -------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read the stage's records, unless the read is stale.

        A read without this peer's own record, after it stored one, is stale: the DHT lagged or the lookup
        failed (the record is stored every progress period and lives three). The last view is kept (and
        the read counted in ``stale_reads``): taken as the stage's state, such a read makes every peer
        look absent, and a server that thinks it is alone steps with its own gradients only.
        """
        records = parse_stage(await self.rt.dht_get(self.key))
        me = self.rt.peer_id
        if self._stored and me not in records:
            self.stale_reads += 1
            return
        self.records = records
        self._others = {peer: r for peer, r in records.items() if peer != me and r.ready}
        now = self.rt.now()
        self._last_seen = {peer: seen for peer, seen in self._last_seen.items() if now - seen <= self.record_lifetime_s}
        self._last_seen.update(dict.fromkeys(self._others, now))

    @property
    def record_lifetime_s(self) -> float:
        """How long a stored record lives: three progress periods."""
        return 3 * self.cfg.progress_period_s

    def alone(self) -> bool:
        """No other ready peer in the last read, nor in any read within a record's lifetime.

        A peer missing from one read may be alive with its store held up by a lagging DHT (seen on a loaded live
        swarm, also right after averaging with it: see :meth:`saw`): a server that takes that for being alone steps
        with its own gradients, and its weights drift from the stage's (it forms a group instead, and averages
        alone only if nobody joins).
        """
        now = self.rt.now()
        return not self._others and all(now - seen > self.record_lifetime_s for seen in self._last_seen.values())

    def saw(self, peers: list[str]) -> None:
        """``peers`` were alive now (they averaged with this peer): for :meth:`alone`, as if seen in a read."""
        now = self.rt.now()
        self._last_seen.update((peer, now) for peer in peers if peer != self.rt.peer_id)

    def others(self) -> dict[str, StageRecord]:
        """The stage's other ready peers."""
        return self._others

    def global_epoch(self) -> int:
        """The newest epoch of the stage, this peer's included."""
        return max([r.epoch for r in self._others.values()] + [self.epoch])

    def newest_epoch(self) -> int:
        """The newest epoch among the others; -1 if there are none."""
        return max((r.epoch for r in self._others.values()), default=-1)

    def newest_epoch_is_averaging(self) -> bool:
        """Whether a peer at the others' newest epoch is ending it (its state is about to change)."""
        newest = self.newest_epoch()
        return any(r.epoch == newest and r.averaging is not None for r in self._others.values())

    def estimated_samples(self) -> float:
        """Samples the stage has accumulated at this peer's epoch (the others' extrapolated from their records)."""
        now = self.rt.now()
        return self.samples + sum(r.samples_at(now) for r in self._others.values() if r.epoch == self.epoch)

    def epoch_due(self) -> bool:
        """Another peer is ahead, or already averaging this epoch (join it), or the stage reached the target."""
        others = self._others.values()
        if any(r.epoch > self.epoch for r in others):
            return True
        if any(r.averaging == self.epoch for r in others):
            return True
        return self.estimated_samples() >= self.cfg.target_batch_size

    def next_check_in(self) -> float:
        """Seconds until the stage should reach the target at its current rate, within [1%, 100%] of a progress period."""
        rate = self._rate + sum(r.rate for r in self._others.values() if r.epoch == self.epoch)
        missing = self.cfg.target_batch_size - self.estimated_samples()
        eta = missing / rate if rate > 0 else self.cfg.progress_period_s
        return min(self.cfg.progress_period_s, max(eta, 0.01 * self.cfg.progress_period_s))
