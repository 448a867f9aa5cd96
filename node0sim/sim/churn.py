"""Churn models: schedules of peers joining, leaving gracefully and crashing.

Pure Python; the simulator turns a schedule into SimPy processes. Models (``ChurnConfig.name``):

- ``none``: no churn.
- ``poisson``: the memoryless baseline of P2P churn analyses. New peers arrive as a Poisson
  process and every session (initial peers included) is exponential with mean
  ``mean_session_s``, as in Liben-Nowell, Balakrishnan & Karger, "Analysis of the Evolution of
  Peer-to-Peer Systems" (PODC 2002) and in the churn experiments of Rhea et al., "Handling
  Churn in a DHT" (USENIX ATC 2004).
- ``volunteer``: heavy-tailed sessions. Measured session lengths of P2P peers are not
  exponential: most sessions are short and a few are very long, and they fit a lognormal or
  Weibull much better (Stutzbach & Rejaie, "Understanding Churn in Peer-to-Peer Networks",
  IMC 2006); availability intervals of volunteer-computing hosts are likewise heavy-tailed
  (Javadi, Kondo, Vincent & Anderson, "Discovering Statistical Models of Availability in Large
  Distributed Systems: An Empirical Study of SETI@home", MASCOTS 2009). Sessions are lognormal
  with median ``session_median_s`` = exp(mu) and shape ``session_sigma``, so their mean is
  median * exp(sigma^2 / 2) (1.65 x the median for sigma = 1). A departed volunteer comes back
  with probability ``rejoin_probability`` after an exponential pause (a modelling assumption,
  not a measured law) as a new peer: it lost its state, so the swarm sees a newcomer.
- ``trace``: replay a CSV file of events (``join``, ``leave``, ``crash``: the peer vanishes and calls to it time out;
  ``kill``: its process dies on a live host, whose kernel resets its connections: calls fail within a round trip).

Departures of the ``poisson`` and ``volunteer`` models are crashes (no goodbye) with probability
``crash_fraction`` and graceful leaves otherwise.

Peer ids invented by the models: arrivals are ``j0``, ``j1``, ...; the k-th rejoin of the
lineage started by peer ``x`` is ``x.rk`` (``p3`` -> ``p3.r1`` -> ``p3.r2``). Ids never collide
with the initial peers, and every id joins at most once and departs at most once.
"""

from __future__ import annotations

import csv
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from node0sim.sim.gpus import GPU_PROFILES

MODELS = ("none", "poisson", "volunteer", "trace")
ACTIONS = ("join", "leave", "crash", "kill")
_TRACE_COLUMNS = ["time", "peer", "event"]


@dataclass(frozen=True)
class ChurnEvent:
    """At virtual time ``time`` (s), ``peer`` joins (with GPU profile ``gpu``), leaves, crashes (vanishes: calls to it
    time out) or is killed (its process dies on a live host: calls to it fail within a round trip)."""

    time: float
    action: str
    peer: str
    gpu: str | None = None


def _order(event: ChurnEvent) -> tuple[float, str, str]:
    return (event.time, event.peer, event.action)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"churn.{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"churn.{key}: must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ChurnConfig:
    """Which churn model to run and its parameters (see the module docstring)."""

    name: str
    join_rate_per_hour: float = 0.0
    mean_session_s: float = 3600.0
    session_median_s: float = 1200.0
    session_sigma: float = 1.0
    crash_fraction: float = 0.3
    rejoin_probability: float = 0.5
    rejoin_delay_s: float = 600.0
    trace_file: str | None = None
    gpu_mix: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"churn.name: {self.name!r} is not one of {list(MODELS)}")
        for key, low, low_open in (
            ("join_rate_per_hour", 0.0, False),
            ("mean_session_s", 0.0, True),
            ("session_median_s", 0.0, True),
            ("session_sigma", 0.0, False),
            ("rejoin_delay_s", 0.0, False),
        ):
            value = _number(key, getattr(self, key))
            if value < low or (low_open and value == low):
                raise ValueError(f"churn.{key}: must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        for key in ("crash_fraction", "rejoin_probability"):
            value = _number(key, getattr(self, key))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"churn.{key}: must be in [0, 1], got {value:g}")
        self._check_gpu_mix()
        if self.name == "trace":
            self._check_trace_file()

    def _check_gpu_mix(self) -> None:
        if not isinstance(self.gpu_mix, Mapping):
            raise ValueError(f"churn.gpu_mix: expected a mapping of GPU profile -> weight, got {self.gpu_mix!r}")
        mix: dict[str, float] = {}
        for gpu, weight in self.gpu_mix.items():
            if gpu not in GPU_PROFILES:
                raise ValueError(f"churn.gpu_mix: unknown GPU profile {gpu!r}; known: {sorted(GPU_PROFILES)}")
            mix[gpu] = _number(f"gpu_mix.{gpu}", weight)
            if mix[gpu] < 0:
                raise ValueError(f"churn.gpu_mix.{gpu}: weight must be >= 0, got {mix[gpu]:g}")
        if mix and sum(mix.values()) <= 0:
            raise ValueError(f"churn.gpu_mix: weights must not all be 0, got {mix}")
        object.__setattr__(self, "gpu_mix", mix)  # a plain dict even when given an OmegaConf node

    def _check_trace_file(self) -> None:
        if not isinstance(self.trace_file, str) or not self.trace_file:
            raise ValueError("churn.trace_file: churn.name=trace needs the path of a CSV trace")
        if not os.path.isfile(self.trace_file):
            raise ValueError(f"churn.trace_file: no such file {self.trace_file!r}")
        try:
            _read_trace(self.trace_file)
        except ValueError as error:
            raise ValueError(f"churn.trace_file: {error}") from None


def _read_trace(path: str) -> list[tuple[int, ChurnEvent]]:
    """Events of the trace at ``path`` with their line numbers, in time order (file order on ties).

    Checks each row and each peer's own history: at most one join, at most one departure, the
    join first, no two events of one peer at the same time. Errors read ``path:line: problem``.
    """
    rows: list[tuple[int, ChurnEvent]] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [cell.strip() for cell in next(reader, [])]
        if header not in (_TRACE_COLUMNS, [*_TRACE_COLUMNS, "gpu"]):
            raise ValueError(
                f"{path}:1: header must be 'time,peer,event' or 'time,peer,event,gpu', got {','.join(header)!r}"
            )
        for row in reader:
            line = reader.line_num
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if len(cells) not in (3, len(header)):
                raise ValueError(f"{path}:{line}: expected {len(header)} columns, got {len(cells)}")
            time_text, peer, action = cells[:3]
            gpu = cells[3] if len(cells) > 3 and cells[3] else None
            try:
                time = float(time_text)
            except ValueError:
                raise ValueError(f"{path}:{line}: time {time_text!r} is not a number") from None
            if not (math.isfinite(time) and time >= 0):
                raise ValueError(f"{path}:{line}: time must be finite and >= 0, got {time_text!r}")
            if not peer:
                raise ValueError(f"{path}:{line}: empty peer id")
            if action not in ACTIONS:
                raise ValueError(f"{path}:{line}: event {action!r} is not one of {list(ACTIONS)}")
            if gpu is not None and action != "join":
                raise ValueError(f"{path}:{line}: a gpu is given for a {action}; only joins take one")
            if gpu is not None and gpu not in GPU_PROFILES:
                raise ValueError(f"{path}:{line}: unknown GPU profile {gpu!r}; known: {sorted(GPU_PROFILES)}")
            rows.append((line, ChurnEvent(time, action, peer, gpu)))
    rows.sort(key=lambda row: (row[1].time, row[0]))
    last: dict[str, tuple[int, ChurnEvent]] = {}
    for line, event in rows:
        if event.peer in last:
            prev_line, prev = last[event.peer]
            if prev.time == event.time:
                raise ValueError(
                    f"{path}:{line}: peer {event.peer!r} already has an event at time {event.time:g} (line {prev_line})"
                )
            if prev.action != "join":
                raise ValueError(
                    f"{path}:{line}: peer {event.peer!r} {event.action}s after it left (line {prev_line}); "
                    "a returning peer needs a new id"
                )
            if event.action == "join":
                raise ValueError(f"{path}:{line}: peer {event.peer!r} joins twice (first on line {prev_line})")
        last[event.peer] = (line, event)
    return rows


def load_trace(path: str) -> list[ChurnEvent]:
    """All events of the CSV trace at ``path`` (columns ``time,peer,event[,gpu]``), sorted.

    A malformed file raises ``ValueError`` naming the file, the line and the problem.
    """
    return sorted((event for _, event in _read_trace(path)), key=_order)


def _trace_schedule(path: str, initial_peers: Sequence[str], horizon_s: float) -> list[ChurnEvent]:
    present = set(initial_peers)
    events = []
    for line, event in _read_trace(path):
        if event.action == "join" and event.peer in present:
            raise ValueError(f"churn.trace_file: {path}:{line}: peer {event.peer!r} joins but is an initial peer")
        if event.action != "join" and event.peer not in present:
            raise ValueError(
                f"churn.trace_file: {path}:{line}: peer {event.peer!r} {event.action}s but is neither "
                "an initial peer nor joined before"
            )
        present.add(event.peer)
        if event.time < horizon_s:
            events.append(event)
    return events


class _ModelSchedule:
    """Draws the events of the ``poisson`` or ``volunteer`` model, lineage after lineage."""

    def __init__(self, cfg: ChurnConfig, initial_peers: Sequence[str], horizon_s: float, rng: random.Random):
        self.cfg = cfg
        self.initial_peers = initial_peers
        self.horizon_s = horizon_s
        self.rng = rng
        self.taken = set(initial_peers)
        self.next_arrival = 0
        self.events: list[ChurnEvent] = []

    def run(self) -> list[ChurnEvent]:
        for peer in self.initial_peers:
            self.live(peer, 0.0)
        rate_per_s = self.cfg.join_rate_per_hour / 3600.0
        time = 0.0
        while rate_per_s > 0:
            time += self.rng.expovariate(rate_per_s)
            if time >= self.horizon_s:
                break
            peer = self.fresh_arrival_id()
            self.join(peer, time)
            self.live(peer, time)
        return self.events

    def fresh_arrival_id(self) -> str:
        while f"j{self.next_arrival}" in self.taken:
            self.next_arrival += 1
        peer = f"j{self.next_arrival}"
        self.taken.add(peer)
        return peer

    def session(self) -> float:
        if self.cfg.name == "poisson":
            return self.rng.expovariate(1.0 / self.cfg.mean_session_s)
        return self.rng.lognormvariate(math.log(self.cfg.session_median_s), self.cfg.session_sigma)

    def join(self, peer: str, time: float) -> None:
        mix = self.cfg.gpu_mix
        gpu = self.rng.choices(list(mix), weights=list(mix.values()))[0] if mix else None
        self.events.append(ChurnEvent(time, "join", peer, gpu))

    def live(self, peer: str, start: float) -> None:
        """Sessions of ``peer`` from ``start``, then of its rejoining successors, up to the horizon."""
        lineage, generation = peer, 0
        while True:
            end = start + self.session()
            if end >= self.horizon_s:
                return
            action = "crash" if self.rng.random() < self.cfg.crash_fraction else "leave"
            self.events.append(ChurnEvent(end, action, peer))
            if self.cfg.name != "volunteer" or self.rng.random() >= self.cfg.rejoin_probability:
                return
            pause = self.rng.expovariate(1.0 / self.cfg.rejoin_delay_s) if self.cfg.rejoin_delay_s > 0 else 0.0
            start = end + pause
            if start >= self.horizon_s:
                return
            generation += 1
            while f"{lineage}.r{generation}" in self.taken:
                generation += 1
            peer = f"{lineage}.r{generation}"
            self.taken.add(peer)
            self.join(peer, start)


def churn_schedule(
    cfg: ChurnConfig, initial_peers: Sequence[str], horizon_s: float, rng: random.Random
) -> list[ChurnEvent]:
    """All churn events in [0, ``horizon_s``), sorted by (time, peer, action).

    ``initial_peers`` are in the swarm at time 0. The result depends only on the arguments and
    the state of ``rng`` (the ``none`` and ``trace`` models draw nothing from it).
    """
    if len(set(initial_peers)) != len(initial_peers):
        raise ValueError(f"initial_peers: duplicate peer ids in {list(initial_peers)}")
    if not (math.isfinite(horizon_s) and horizon_s >= 0):
        raise ValueError(f"horizon_s: must be finite and >= 0, got {horizon_s!r}")
    if cfg.name == "none":
        return []
    if cfg.name == "trace":
        assert cfg.trace_file is not None  # checked by ChurnConfig
        events = _trace_schedule(cfg.trace_file, initial_peers, horizon_s)
    else:
        events = _ModelSchedule(cfg, initial_peers, horizon_s, rng).run()
    return sorted(events, key=_order)
