"""The emulated network: exact transfer times, fair sharing, latency, aborts."""

import random

import pytest
import simpy

from node0sim.sim.network import Endpoint, Network


def _net(latency: float = 0.0) -> tuple[simpy.Environment, Network]:
    env = simpy.Environment()
    return env, Network(env, lambda a, b: latency, 0.0, random.Random(0))


def _arrival(env: simpy.Environment, flow) -> list[float]:
    times: list[float] = []
    flow.done.callbacks.append(lambda _e: times.append(env.now))
    return times


def test_single_transfer_takes_latency_plus_size_over_bandwidth():
    env, net = _net(latency=0.05)
    a, b = Endpoint("a", "r", 80, 80), Endpoint("b", "r", 80, 80)
    size = 1_000_000
    times = _arrival(env, net.transfer(a, b, size))
    env.run()
    assert times == [pytest.approx(0.05 + 8 * size / 80e6, rel=1e-12)]


def test_two_transfers_share_one_uplink_fairly():
    env, net = _net()
    a, b, c = (Endpoint(n, "r", 10, 1000) for n in "abc")
    size = 1_250_000  # 1 s alone at 10 Mb/s
    t1 = _arrival(env, net.transfer(a, b, size))
    t2 = _arrival(env, net.transfer(a, c, size))
    env.run()
    assert t1 == [pytest.approx(2.0)] and t2 == [pytest.approx(2.0)]


def test_rates_are_recomputed_when_a_flow_finishes():
    env, net = _net()
    a, b, c = (Endpoint(n, "r", 8, 1000) for n in "abc")  # 1 MB/s uplink
    short = _arrival(env, net.transfer(a, b, 500_000))
    long = _arrival(env, net.transfer(a, c, 1_500_000))
    env.run()
    # both at 0.5 MB/s until the short one ends at t=1; the long one then has 1 MB left at 1 MB/s
    assert short == [pytest.approx(1.0)] and long == [pytest.approx(2.0)]


def test_max_min_fairness_gives_spare_capacity_to_unconstrained_flow():
    env, net = _net()
    fast = Endpoint("fast", "r", 30, 1000)
    slow_receiver = Endpoint("slow", "r", 1000, 10)
    other = Endpoint("other", "r", 1000, 1000)
    f1 = net.transfer(fast, slow_receiver, 1)
    f2 = net.transfer(fast, other, 1)
    # f1 is limited to 10 Mb/s by the receiver; f2 gets the remaining 20 Mb/s of the uplink
    assert f1.rate == pytest.approx(10e6 / 8) and f2.rate == pytest.approx(20e6 / 8)
    env.run()


def test_late_flow_slows_down_an_ongoing_one():
    env, net = _net()
    a, b, c = (Endpoint(n, "r", 8, 1000) for n in "abc")
    first = _arrival(env, net.transfer(a, b, 1_000_000))  # alone: 1 s

    def late():
        yield env.timeout(0.5)
        net.transfer(a, c, 250_000)

    env.process(late())
    env.run()
    # 0.5 MB done alone; then 0.25 MB each at 0.5 MB/s (0.5 s); then 0.25 MB alone (0.25 s)
    assert first == [pytest.approx(1.25)]


def test_aborted_flow_frees_bandwidth_and_never_arrives():
    env, net = _net()
    a, b, c = (Endpoint(n, "r", 8, 1000) for n in "abc")
    kept = _arrival(env, net.transfer(a, b, 1_000_000))
    dropped_flow = net.transfer(a, c, 1_000_000)
    dropped = _arrival(env, dropped_flow)

    def abort():
        yield env.timeout(1.0)
        net.abort(dropped_flow)

    env.process(abort())
    env.run()
    # 0.5 MB at half rate in the first second, the other 0.5 MB alone in 0.5 s
    assert kept == [pytest.approx(1.5)] and dropped == []


def test_bytes_are_counted_and_zero_bandwidth_is_refused():
    env, net = _net()
    a, b = Endpoint("a", "r", 8, 8), Endpoint("b", "r", 8, 8)
    net.transfer(a, b, 123)
    net.transfer(a, b, 77)
    assert net.bytes_sent == 200
    with pytest.raises(ValueError, match="bandwidth"):
        Endpoint("z", "r", 0, 8)


def test_equal_share_model_splits_each_link_and_takes_the_smaller_share():
    env = simpy.Environment()
    net = Network(env, lambda a, b: 0.0, 0.0, random.Random(0), sharing="equal")
    fast = Endpoint("fast", "r", 30, 1000)
    slow_receiver = Endpoint("slow", "r", 1000, 10)
    other = Endpoint("other", "r", 1000, 1000)
    f1 = net.transfer(fast, slow_receiver, 1)
    f2 = net.transfer(fast, other, 1)
    # each gets half the 30 Mb/s uplink, f1 is further capped by the 10 Mb/s downlink (no redistribution)
    assert f1.rate == pytest.approx(10e6 / 8) and f2.rate == pytest.approx(15e6 / 8)
    env.run()
    with pytest.raises(ValueError, match="link_sharing"):
        Network(env, lambda a, b: 0.0, 0.0, random.Random(0), sharing="fancy")
