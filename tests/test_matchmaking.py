"""Matchmaking on virtual time: who ends up in a group, and registrations that must not break it."""

from node0sim.protocol.averaging import AveragingConfig, group_key
from node0sim.protocol.matchmaking import Matchmaker, parse_group
from tests.simutil import add, make_sim

CFG = AveragingConfig(8, matchmaking_time_s=1.0, matchmaking_slack_s=0.2, averaging_timeout_s=5.0)


def _groups(vandal_values: dict, starts: dict[str, float]) -> dict[str, tuple[list[str], list[float]]]:
    """Each honest peer (registering at its start time) forms its group for epoch 0, after a vandal stored ``vandal_values``."""
    sim = make_sim(latency_s=0.01, dht_latency_s=0.02)
    peers = {name: add(sim, name) for name in starts}
    results = {}

    async def join(name: str, start: float):
        rt = peers[name].runtime
        await rt.sleep(start)
        results[name] = await Matchmaker(rt, "run", 0, CFG, bandwidth_mbps=10.0 * len(name)).form_group(0)

    for vandal, value in vandal_values.items():  # each vandal's own entry
        sim.dht.store(group_key("run", 0, 0), vandal, value, 100)
    tasks = [peers[name].runtime.spawn(join(name, start)) for name, start in starts.items()]
    sim.run()
    assert all(not task.process.is_alive for task in tasks)
    return results


def test_peers_registered_within_the_window_of_the_first_form_one_group():
    groups = _groups({}, {"a": 0.1, "bb": 0.5, "late": 0.1 + CFG.matchmaking_time_s + 0.3})
    assert groups["a"] == groups["bb"] == (["a", "bb"], [10.0, 20.0])
    assert groups["late"] == (["late"], [40.0])  # registered after the window closed: alone


def test_malformed_and_impossible_registrations_are_ignored():
    vandal_values = {
        "junk": "junk", "half": {"time": 0.2}, "nan": {"time": float("nan"), "bandwidth": 1.0},
        "ancient": {"time": 0.0, "bandwidth": 1.0},  # older than a registration lives: would close every window at once
    }
    lifetime = CFG.matchmaking_time_s + CFG.averaging_timeout_s
    groups = _groups(vandal_values, {"a": lifetime + 1.0, "bb": lifetime + 1.5})
    assert groups["a"] == groups["bb"] == (["a", "bb"], [10.0, 20.0])


def test_parse_group_keeps_only_well_formed_registrations():
    value = {"a": {"time": 1.0, "bandwidth": 5.0}, "b": {"time": 1, "bandwidth": 0.0}, "c": {"time": True, "bandwidth": 1.0},
             "d": {"time": 1.0, "bandwidth": 5.0, "x": 1}, "e": None}
    assert parse_group(value) == {"a": (1.0, 5.0)}
    assert parse_group(None) == {} and parse_group([1]) == {}


def _with_a_late_registration(announced_to_a: dict[str, float] | None) -> dict[str, tuple[list[str], list[float]]]:
    """``a`` registers at 0.1 s, ``slow`` at 0.2 s, but the store of ``slow`` lands 2.5 s later (a lagging DHT), after
    ``a``'s window and slack; ``announced_to_a``: what ``a`` saw in the stage records."""
    sim = make_sim(latency_s=0.01, dht_latency_s=0.02)
    peers = {name: add(sim, name) for name in ("a", "slow")}
    slow_rt = peers["slow"].runtime
    store = slow_rt.dht_store

    async def late_store(key, value, expires_in, per_peer=False):
        await slow_rt.sleep(2.5)
        await store(key, value, expires_in, per_peer=per_peer)

    slow_rt.dht_store = late_store
    results = {}

    async def join(name: str, start: float, announced: dict[str, float] | None):
        rt = peers[name].runtime
        await rt.sleep(start)
        results[name] = await Matchmaker(rt, "run", 0, CFG, bandwidth_mbps=10.0).form_group(0, announced)

    tasks = [peers["a"].runtime.spawn(join("a", 0.1, announced_to_a)), slow_rt.spawn(join("slow", 0.2, {"a": 0.1}))]
    sim.run()
    assert all(not task.process.is_alive for task in tasks)
    return results


def test_a_peer_that_announced_the_round_is_waited_for_when_its_registration_lands_late():
    # without the announcement "a" cannot know, and averages alone while "slow" counts it in
    assert _with_a_late_registration(None) == {"a": (["a"], [10.0]), "slow": (["a", "slow"], [10.0, 10.0])}
    # "slow"'s stage record said at 0.2 s that it ends epoch 0 (averaging == 0): "a" waits for its registration
    both = (["a", "slow"], [10.0, 10.0])
    assert _with_a_late_registration({"slow": 0.2}) == {"a": both, "slow": both}
