"""TimerHeap: many pending times served by one SimPy timer."""

from __future__ import annotations

import simpy

from node0sim.sim.timers import TimerHeap, scheduled_events, succeed_at


def test_due_entries_fire_in_time_order_and_stale_ones_are_skipped():
    env = simpy.Environment()
    live = {"a": True, "b": False, "c": True, "d": True}
    fired: list[tuple[float, str]] = []
    timers: TimerHeap[str] = TimerHeap(env, lambda item, _tag: live[item], lambda item: fired.append((env.now, item)))
    for at, item in ((3.0, "c"), (1.0, "a"), (2.0, "b"), (3.0, "d")):
        timers.push(at, item)
        timers.arm()
    env.run()
    assert fired == [(1.0, "a"), (3.0, "c"), (3.0, "d")]  # equal times: push order
    assert timers.at == float("inf") and not timers.entries


def test_an_earlier_entry_supersedes_the_armed_timer_and_on_due_may_push():
    env = simpy.Environment()
    fired: list[tuple[float, str]] = []

    def on_due(item: str) -> None:
        fired.append((env.now, item))
        if item == "first":
            timers.push(env.now + 0.5, "again")
            timers.arm()

    timers: TimerHeap[str] = TimerHeap(env, lambda _item, _tag: True, on_due)
    timers.push(5.0, "late")
    timers.arm()
    timers.push(1.0, "first")
    timers.arm()
    assert timers.at == 1.0
    env.run()
    assert fired == [(1.0, "first"), (1.5, "again"), (5.0, "late")]


def test_succeed_at_processes_an_existing_event_at_that_time():
    env = simpy.Environment()
    event = env.event()
    seen: list[float] = []
    event.callbacks.append(lambda _e: seen.append(env.now))
    before = scheduled_events(env)
    succeed_at(env, event, 2.5)
    assert scheduled_events(env) == before + 2  # one for the event, one for the reading
    env.run()
    assert seen == [2.5] and event.ok and event.value is None
