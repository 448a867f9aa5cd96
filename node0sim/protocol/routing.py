"""Trainer-side routing: which peer of a stage gets the next request.

SWARM's "expected finish time" balancing (Ryabinin et al., 2023, "SWARM Parallelism", Sec. 3.2, and
its ``ExpertBalancer``): the router keeps a throughput estimate per peer (an exponential moving
average of observed rates) and the time until which its own in-flight requests keep each peer busy,
sends a request to the peer that would finish it earliest, counts a backward request as
``backward_weight`` forwards (2.5 in SWARM), and bans a peer that failed for a while.

A failure is also an observation: it moves the peer's throughput estimate toward 0 like an observed rate of 0 (one EMA
step), and each failure in a row (no success between) doubles the peer's ban, from ``ban_s`` up to ``max_ban_s``. What
the router learned of a peer outlives its record: a banned peer that withdraws and announces itself again keeps its
ban, its failure count and its estimate. A request that another peer answered first (a trainer's hedge) lowers the
estimate toward the rate its wait implies, without a ban.

With ``require_proof`` (a trainer's ``probe_timeout_s``), a peer first listed gets no work until it answered once (the
trainer's probe): a stage record costs nothing to write, an answer from a process serving the stage does.

Plain Python: times are seconds passed in by the caller, so this works on any backend.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass

MIN_THROUGHPUT = 1e-9
"""Floor of a throughput estimate (samples/s) lowered by failures: a cost divided by it stays finite."""


@dataclass(slots=True)
class PeerState:
    """What the router knows about one peer of a stage."""

    throughput: float
    """Samples/s, an EMA of observed rates, seeded with the peer's announced throughput."""
    busy_until: float = 0.0
    """Time until which the requests this router sent are expected to keep the peer busy."""
    banned_until: float = 0.0
    """The peer is not chosen before this time."""
    tie_rank: float = 0.0
    """Random rank breaking ties between equally good peers (drawn once per peer)."""
    failures: int = 0
    """Failures in a row (reset by a success): the ban doubles with each."""
    proven: bool = True
    """Whether the peer may get work: False for a new peer while the router requires proof, until it answers."""


class Router:
    """Picks, per stage, the peer expected to finish a request earliest (SWARM's balancer).

    Ties between peers with the same expected finish time go to the lowest ``tie_rank`` (drawn from
    ``rng`` when the peer is first seen, then the peer id): deterministic for a seeded ``rng``, yet
    trainers with different seeds do not all pile onto the same peer when everything is idle.
    """

    def __init__(
        self,
        rng: random.Random,
        ema_alpha: float = 0.2,
        ban_s: float = 60.0,
        backward_weight: float = 2.5,
        default_throughput: float = 1.0,
        max_ban_s: float | None = None,
        require_proof: bool = False,
    ):
        """``max_ban_s`` None: bans do not grow (every ban lasts ``ban_s``). ``require_proof``: a new peer gets no work
        until it answered once (:meth:`prove`, or a success)."""
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        if ban_s < 0:
            raise ValueError(f"ban_s must be >= 0, got {ban_s}")
        if max_ban_s is not None and max_ban_s < ban_s:
            raise ValueError(f"max_ban_s must be >= ban_s ({ban_s}), got {max_ban_s}")
        if backward_weight <= 0:
            raise ValueError(f"backward_weight must be > 0, got {backward_weight}")
        if default_throughput <= 0:
            raise ValueError(f"default_throughput must be > 0, got {default_throughput}")
        self.rng = rng
        self.ema_alpha = ema_alpha
        self.ban_s = ban_s
        self.max_ban_s = ban_s if max_ban_s is None else max_ban_s
        self.backward_weight = backward_weight
        self.default_throughput = default_throughput
        self.require_proof = require_proof
        self._stages: dict[int, dict[str, PeerState]] = {}
        self._penalized: dict[int, dict[str, PeerState]] = {}
        """Forgotten peers that had failed, per stage: restored if they announce themselves again."""

    def _cost(self, samples: int, backward: bool) -> float:
        return samples * (self.backward_weight if backward else 1.0)

    def _state(self, stage: int, peer: str) -> PeerState | None:
        return self._stages.get(stage, {}).get(peer)

    def state(self, stage: int, peer: str) -> PeerState:
        """The router's state for ``peer`` of ``stage`` (KeyError if it is not a known peer)."""
        return self._stages[stage][peer]

    def update_peers(self, stage: int, announced: dict[str, float]) -> None:
        """Set the current peers of ``stage`` with their announced throughputs (samples/s).

        New peers start from the announced value (``default_throughput`` if it is not a positive
        number); known peers keep their learned estimate and ban; peers no longer listed are forgotten,
        except their penalty: one that had failed gets its state back (ban, failures, estimate) when listed again.
        """
        old = self._stages.get(stage, {})
        penalized = self._penalized.setdefault(stage, {})
        new: dict[str, PeerState] = {}
        for peer in sorted(announced):
            if peer in old:
                new[peer] = old[peer]
                continue
            if peer in penalized:
                new[peer] = penalized.pop(peer)
                continue
            value = announced[peer]
            throughput = value if math.isfinite(value) and value > 0 else self.default_throughput
            new[peer] = PeerState(throughput=throughput, tie_rank=self.rng.random(), proven=not self.require_proof)
        penalized.update({peer: st for peer, st in old.items() if peer not in new and st.failures})
        self._stages[stage] = new

    def peers(self, stage: int) -> list[str]:
        """The known peers of ``stage``, sorted by id."""
        return sorted(self._stages.get(stage, {}))

    def proven_peers(self, stage: int) -> list[str]:
        """The known peers of ``stage`` that may get work (every one, unless the router requires proof), sorted by id."""
        return sorted(p for p, s in self._stages.get(stage, {}).items() if s.proven)

    def unproven(self, stage: int, now: float) -> list[str]:
        """The peers of ``stage`` still to answer once before they get work, not banned at ``now``, sorted by id."""
        return sorted(p for p, s in self._stages.get(stage, {}).items() if not s.proven and s.banned_until <= now)

    def prove(self, stage: int, peer: str) -> None:
        """``peer`` answered: from now on it may get work (unknown, forgotten peers are ignored)."""
        st = self._state(stage, peer)
        if st is not None:
            st.proven = True

    def available(self, stage: int, now: float) -> list[str]:
        """The peers of ``stage`` that are not banned at ``now``, sorted by id."""
        return sorted(p for p, s in self._stages.get(stage, {}).items() if s.banned_until <= now)

    def choose(
        self,
        stage: int,
        samples: int,
        now: float,
        backward: bool = False,
        exclude: Collection[str] = (),
    ) -> str | None:
        """The available, non-excluded peer of ``stage`` that would finish this request earliest.

        Expected finish = ``max(now, busy_until) + cost / throughput`` with ``cost = samples`` for a
        forward and ``samples * backward_weight`` for a backward. The chosen peer's ``busy_until``
        moves to that finish time. None if no peer is available.
        """
        cost = self._cost(samples, backward)
        # the least (finish, tie_rank, peer), compared field by field without building tuples (hot path)
        best: PeerState | None = None
        best_peer = ""
        best_finish = best_rank = 0.0
        for peer, st in self._stages.get(stage, {}).items():
            if st.banned_until > now or not st.proven or (exclude and peer in exclude):
                continue
            busy = st.busy_until
            finish = (busy if busy > now else now) + cost / st.throughput
            if (
                best is None
                or finish < best_finish
                or (finish == best_finish and (st.tie_rank < best_rank or (st.tie_rank == best_rank and peer < best_peer)))
            ):
                best, best_peer, best_finish, best_rank = st, peer, finish, st.tie_rank
        if best is None:
            return None
        best.busy_until = best_finish
        return best_peer

    def report_success(
        self,
        stage: int,
        peer: str,
        samples: int,
        elapsed_s: float,
        now: float,
        backward: bool = False,
    ) -> None:
        """A request of ``samples`` to ``peer`` took ``elapsed_s`` and completed at ``now``.

        The throughput EMA moves toward the observed rate ``cost / elapsed_s``. If the request
        finished earlier than predicted (``cost / throughput``), the peer's queue is shorter than
        assumed: ``busy_until`` moves back by the difference, but not before ``now`` (so it lands on
        ``now`` when this was the only request in flight). Unknown (forgotten) peers are ignored.
        """
        st = self._state(stage, peer)
        if st is None or elapsed_s <= 0:
            return
        cost = self._cost(samples, backward)
        saved = cost / st.throughput - elapsed_s
        if saved > 0:
            st.busy_until = max(now, st.busy_until - saved)
        st.throughput += self.ema_alpha * (cost / elapsed_s - st.throughput)
        st.failures = 0

    def report_outpaced(self, stage: int, peer: str, samples: int, elapsed_s: float, backward: bool = False) -> None:
        """A request of ``samples`` to ``peer``, unanswered after ``elapsed_s``, was answered by another peer (a hedge):
        the throughput EMA moves toward ``cost / elapsed_s``, the most its rate can be; no ban, no failure counted."""
        st = self._state(stage, peer)
        if st is None or elapsed_s <= 0:
            return
        rate = self._cost(samples, backward) / elapsed_s
        if rate < st.throughput:
            st.throughput = max(st.throughput + self.ema_alpha * (rate - st.throughput), MIN_THROUGHPUT)

    def ban_for(self, failures: int) -> float:
        """The ban after ``failures`` failures in a row: ``ban_s`` doubled for each after the first, at most ``max_ban_s``."""
        return min(self.max_ban_s, self.ban_s * 2.0 ** min(failures - 1, 64))

    def report_failure(self, stage: int, peer: str, now: float) -> None:
        """``peer`` failed a request: ban it for :meth:`ban_for` its failures in a row, forget its queue, and move its
        throughput estimate toward 0 (one EMA step, as an observed rate of 0)."""
        st = self._state(stage, peer)
        if st is None:
            return
        st.failures += 1
        st.banned_until = now + self.ban_for(st.failures)
        st.busy_until = now
        st.throughput = max(st.throughput * (1.0 - self.ema_alpha), MIN_THROUGHPUT)
