"""Matchmaking: which peers of a stage average together at the end of an epoch.

As in hivemind's matchmaking, a group forms in the DHT: peers that ended ``epoch`` register under
``group_key`` with their bandwidth, and the group is everyone registered within
``matchmaking_time_s`` of the first registration.
"""

from __future__ import annotations

from typing import Any, Mapping

from node0sim.protocol.averaging import AveragingConfig, group_key
from node0sim.protocol.progress import is_finite_number
from node0sim.runtime import Runtime


def parse_group(value: Any) -> dict[str, tuple[float, float]]:
    """The well-formed registrations in a group key's DHT value: ``{peer: (time, bandwidth)}``; others are skipped."""
    if not isinstance(value, dict):
        return {}
    return {
        peer: (r["time"], r["bandwidth"]) for peer, r in value.items()
        if isinstance(r, dict) and r.keys() == {"time", "bandwidth"} and is_finite_number(r["time"])
        and is_finite_number(r["bandwidth"]) and r["bandwidth"] > 0
    }


class Matchmaker:
    """Forms this peer's averaging groups for one stage.

    Every member of a group that formed sees the same members (sorted) and bandwidths, as long as
    the DHT delivers the registrations within ``matchmaking_slack_s`` after the window closes; a
    peer that registered too late averages alone.
    """

    def __init__(self, rt: Runtime, run_id: str, stage: int, cfg: AveragingConfig, bandwidth_mbps: float):
        self.rt = rt
        self.run_id = run_id
        self.stage = stage
        self.cfg = cfg
        self.bandwidth_mbps = bandwidth_mbps

    def alone(self) -> tuple[list[str], list[float]]:
        """A group of this peer only."""
        return [self.rt.peer_id], [self.bandwidth_mbps]

    async def form_group(self, epoch: int, announced: Mapping[str, float] | None = None) -> tuple[list[str], list[float]]:
        """The members of this peer's group for ``epoch`` and their bandwidths (Mb/s).

        ``announced``: peers whose stage record says they are ending ``epoch``, with the record's time. One that
        announced within the window but whose registration is not visible yet (a lagging DHT: seen on a loaded
        live swarm) is waited for, re-reading every ``matchmaking_slack_s`` for up to ``averaging_timeout_s`` (what a
        member's all-reduce waits for another anyway); without the wait this peer would average alone while that
        one counts it in.
        """
        me = self.rt.peer_id
        key = group_key(self.run_id, self.stage, epoch)
        ttl = self.cfg.matchmaking_time_s + self.cfg.averaging_timeout_s
        registered = self.rt.now()
        await self.rt.dht_store(key, {"time": registered, "bandwidth": self.bandwidth_mbps}, expires_in=ttl, per_peer=True)
        group = parse_group(await self.rt.dht_get(key))
        # the window opens at the earliest registration seen, this peer's included (a read that lags may miss
        # it); a time older than a registration lives, or a window ahead, is no honest peer's and is ignored
        oldest = registered - ttl
        times = [time for time, _ in group.values() if oldest <= time <= registered + self.cfg.matchmaking_time_s]
        deadline = min(times + [registered]) + self.cfg.matchmaking_time_s
        await self.rt.sleep(max(0.0, deadline + self.cfg.matchmaking_slack_s - self.rt.now()))
        group = parse_group(await self.rt.dht_get(key))
        expected = {peer for peer, time in (announced or {}).items() if oldest <= time <= deadline}
        give_up = self.rt.now() + self.cfg.averaging_timeout_s
        while expected - group.keys() and self.rt.now() < give_up:
            await self.rt.sleep(self.cfg.matchmaking_slack_s)
            group = parse_group(await self.rt.dht_get(key))
        members = sorted(peer for peer, (time, _) in group.items() if oldest <= time <= deadline)
        if me not in members:
            return self.alone()
        return members, [group[peer][1] for peer in members]
