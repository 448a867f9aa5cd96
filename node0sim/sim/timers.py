"""One SimPy timer for many pending completions, and the one place that touches SimPy internals.

The network (flow completions) and the engine (RPC deadlines) each keep many pending times of
which only the earliest matters, and most are cancelled or superseded before they are due.
Scheduling a SimPy event per entry would flood SimPy's queue with dead events; a
:class:`TimerHeap` keeps the entries in its own heap and one SimPy event at the earliest live one.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Callable, Generic, TypeVar

import simpy
from simpy.events import NORMAL

Item = TypeVar("Item")


def succeed_at(env: simpy.Environment, event: simpy.Event, at: float) -> None:
    """Trigger the pending ``event`` (value None) to be processed at virtual time ``at``.

    SimPy's public API processes a triggered event either now (``succeed``) or, for a new
    ``Timeout``, after a delay added to now; this schedules an existing event at a given time, with the
    priority and the place in SimPy's event numbering that a timeout created here would get. It
    writes SimPy's private fields (``_ok``, ``_value``, ``_queue``, ``_eid``; SimPy 4.1): the only code
    of the simulator that does.
    """
    event._ok = True
    event._value = None
    heapq.heappush(env._queue, (at, NORMAL, next(env._eid), event))


def scheduled_events(env: simpy.Environment) -> int:
    """How many events ``env`` has scheduled so far (reading SimPy's event counter uses up one number)."""
    return next(env._eid)


class TimerHeap(Generic[Item]):
    """Pending ``(time, item, tag)`` entries served by a single SimPy timer at the earliest live one.

    An entry is never removed early: once ``is_live(item, tag)`` is false it is skipped (lazily, when
    it reaches the top of the heap). Call :meth:`arm` after pushing. When the timer fires, every
    live entry due by then is passed to ``on_due(item)``, in order of time and then of pushing, and the
    timer is re-armed; ``on_due`` may push and arm. An entry is due when its time is at most now
    plus ``slack * max(1, now)`` (rounding tolerance). With ``exact`` the timer fires at the entry's
    time itself; otherwise at ``now + (time - now)``, the time a SimPy timeout of that delay gets.
    """

    __slots__ = ("entries", "at", "_env", "_is_live", "_on_due", "_slack", "_exact", "_order", "_token")

    def __init__(
        self,
        env: simpy.Environment,
        is_live: Callable[[Item, Any], bool],
        on_due: Callable[[Item], None],
        *,
        slack: float = 0.0,
        exact: bool = True,
    ):
        self.entries: list[tuple[float, int, Item, Any]] = []
        self.at = math.inf
        """Time of the armed timer (inf: none)."""
        self._env = env
        self._is_live = is_live
        self._on_due = on_due
        self._slack = slack
        self._exact = exact
        self._order = itertools.count()
        self._token = 0

    def push(self, at: float, item: Item, tag: Any = None) -> None:
        """Add an entry (it takes effect at the next :meth:`arm`)."""
        heapq.heappush(self.entries, (at, next(self._order), item, tag))

    def arm(self) -> None:
        """Drop stale entries from the top and move the timer earlier if the earliest live entry is earlier."""
        entries, is_live = self.entries, self._is_live
        while entries and not is_live(entries[0][2], entries[0][3]):
            heapq.heappop(entries)
        if entries and entries[0][0] < self.at:
            self.at = entries[0][0]
            self._token += 1
            token = self._token
            env = self._env
            timer = simpy.Event(env)
            timer.callbacks.append(lambda _event: self._fire(token))
            succeed_at(env, timer, self.at if self._exact else env.now + max(0.0, self.at - env.now))

    def _fire(self, token: int) -> None:
        if token != self._token:
            return  # superseded by an earlier timer
        self.at = math.inf
        now = self._env.now
        due = now + self._slack * max(1.0, now)
        entries, is_live, on_due = self.entries, self._is_live, self._on_due
        while entries and entries[0][0] <= due:
            _, _, item, tag = heapq.heappop(entries)
            if is_live(item, tag):
                on_due(item)
        self.arm()
