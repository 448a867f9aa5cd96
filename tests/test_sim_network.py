"""The emulated network: exact transfer times, fair sharing, latency, aborts."""

import math
import random

import pytest
import simpy

from node0sim.sim.network import SHARING_MODELS, Endpoint, Flow, Network

every_model = pytest.mark.parametrize("sharing", SHARING_MODELS)
"""Single-bottleneck cases, where every sharing model must give the same times."""


def _net(latency: float = 0.0, sharing: str = "maxmin") -> tuple[simpy.Environment, Network]:
    env = simpy.Environment()
    return env, Network(env, lambda a, b: latency, 0.0, random.Random(0), sharing)


def _arrival(env: simpy.Environment, flow) -> list[float]:
    times: list[float] = []
    flow.done.callbacks.append(lambda _e: times.append(env.now))
    return times


@every_model
def test_single_transfer_takes_latency_plus_size_over_bandwidth(sharing: str):
    env, net = _net(latency=0.05, sharing=sharing)
    a, b = Endpoint("a", "r", 80, 80), Endpoint("b", "r", 80, 80)
    size = 1_000_000
    times = _arrival(env, net.transfer(a, b, size))
    env.run()
    assert times == [pytest.approx(0.05 + 8 * size / 80e6, rel=1e-12)]


@every_model
def test_two_transfers_share_one_uplink_fairly(sharing: str):
    env, net = _net(sharing=sharing)
    a, b, c = (Endpoint(n, "r", 10, 1000) for n in "abc")
    size = 1_250_000  # 1 s alone at 10 Mb/s
    t1 = _arrival(env, net.transfer(a, b, size))
    t2 = _arrival(env, net.transfer(a, c, size))
    env.run()
    assert t1 == [pytest.approx(2.0)] and t2 == [pytest.approx(2.0)]


@every_model
def test_rates_are_recomputed_when_a_flow_finishes(sharing: str):
    env, net = _net(sharing=sharing)
    a, b, c = (Endpoint(n, "r", 8, 1000) for n in "abc")  # 1 MB/s uplink
    short = _arrival(env, net.transfer(a, b, 500_000))
    long = _arrival(env, net.transfer(a, c, 1_500_000))
    env.run()
    # both at 0.5 MB/s until the short one ends at t=1; the long one then has 1 MB left at 1 MB/s
    assert short == [pytest.approx(1.0)] and long == [pytest.approx(2.0)]


def _two_flows_one_capped_by_its_receiver(sharing: str) -> tuple[float, float]:
    """Rates (Mb/s) of two flows from a 30 Mb/s uplink, one to a 10 Mb/s downlink and one to a fast one."""
    env, net = _net(sharing=sharing)
    fast = Endpoint("fast", "r", 30, 1000)
    slow_receiver = Endpoint("slow", "r", 1000, 10)
    other = Endpoint("other", "r", 1000, 1000)
    f1 = net.transfer(fast, slow_receiver, 1)
    f2 = net.transfer(fast, other, 1)
    rates = (f1.rate * 8 / 1e6, f2.rate * 8 / 1e6)
    env.run()
    return rates


def test_max_min_fairness_gives_spare_capacity_to_unconstrained_flow():
    # the capped flow gets the receiver's 10 Mb/s; the other the remaining 20 Mb/s of the uplink
    assert _two_flows_one_capped_by_its_receiver("maxmin") == (pytest.approx(10), pytest.approx(20))


@every_model
def test_late_flow_slows_down_an_ongoing_one(sharing: str):
    env, net = _net(sharing=sharing)
    a, b, c = (Endpoint(n, "r", 8, 1000) for n in "abc")
    first = _arrival(env, net.transfer(a, b, 1_000_000))  # alone: 1 s

    def late():
        yield env.timeout(0.5)
        net.transfer(a, c, 250_000)

    env.process(late())
    env.run()
    # 0.5 MB done alone; then 0.25 MB each at 0.5 MB/s (0.5 s); then 0.25 MB alone (0.25 s)
    assert first == [pytest.approx(1.25)]


@every_model
def test_aborted_flow_frees_bandwidth_and_never_arrives(sharing: str):
    env, net = _net(sharing=sharing)
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
    # each gets half the 30 Mb/s uplink, the capped one only 10 Mb/s of it (no redistribution)
    assert _two_flows_one_capped_by_its_receiver("equal") == (pytest.approx(10), pytest.approx(15))
    with pytest.raises(ValueError, match="link_sharing"):
        _net(sharing="fancy")


def test_per_link_model_serves_each_link_fully_and_delivers_when_both_are_done():
    env, net = _net(sharing="per_link")
    fast = Endpoint("fast", "r", 30, 1000)
    slow_receiver = Endpoint("slow", "r", 1000, 10)
    other = Endpoint("other", "r", 1000, 1000)
    small = _arrival(env, net.transfer(fast, slow_receiver, 1_875_000))  # 15 Mbit
    big = _arrival(env, net.transfer(fast, other, 3_750_000))  # 30 Mbit
    env.run()
    # uplink: 15 Mb/s each until the small one has crossed it (1 s), then 30 Mb/s for the big one's
    # last 15 Mbit (0.5 s); the small one's 10 Mb/s downlink still needs 1.5 s for its 15 Mbit
    assert small == [pytest.approx(1.5)] and big == [pytest.approx(1.5)]


def test_per_link_model_matches_a_hand_computed_three_flow_schedule_with_abort():
    env, net = _net(sharing="per_link")
    a, b, c, d = (Endpoint(n, "r", 8, 8) for n in "abcd")  # 1 MB/s each way
    ab = _arrival(env, net.transfer(a, b, 1_000_000))
    ac_flow = net.transfer(a, c, 3_000_000)
    ac = _arrival(env, ac_flow)
    db = _arrival(env, net.transfer(d, b, 500_000))

    def abort():
        yield env.timeout(2.0)
        net.abort(ac_flow)

    env.process(abort())
    env.run()
    # a's uplink: ab and ac at 0.5 MB/s -> ab has crossed it at 2 s; b's downlink: ab and db at
    # 0.5 MB/s -> db done at 1 s, then ab alone: 0.5 MB by 1 s + 0.5 MB by 1.5 s; ab is delivered
    # when its slower link (the uplink) is done: 2 s. ac is aborted at 2 s and never arrives.
    assert ab == [pytest.approx(2.0)] and db == [pytest.approx(1.0)] and ac == []
    assert not a.up.flows and not b.down.flows and not c.down.flows


# ---- transport model (sim.transport=tcp) -------------------------------------------------------

from node0sim.sim.network import INITIAL_WINDOW_BYTES, RTO_MIN_S, TcpModel, slow_start_delay  # noqa: E402

NO_FRAMING = dict(message_overhead_bytes=0.0, byte_overhead=1.0)


def _tcp_net(latency: float, tcp: TcpModel, sharing: str = "maxmin") -> tuple[simpy.Environment, Network]:
    env = simpy.Environment()
    return env, Network(env, lambda a, b: latency, 0.0, random.Random(0), sharing, tcp)


def test_framing_charges_per_message_and_per_byte_overhead():
    tcp = TcpModel(window_bytes=1e12, message_overhead_bytes=600, byte_overhead=1.05)
    env, net = _tcp_net(0.0, tcp)
    a, b = Endpoint("a", "r", 8, 8), Endpoint("b", "r", 8, 8)  # 1 MB/s
    times = _arrival(env, net.transfer(a, b, 1_000_000))
    env.run()
    assert times == [pytest.approx((600 + 1.05 * 1_000_000) / 1e6)]


def test_a_zero_byte_message_still_carries_its_framing():
    env, net = _tcp_net(0.0, TcpModel(window_bytes=1e12, message_overhead_bytes=1000, byte_overhead=1.0))
    a, b = Endpoint("a", "r", 8, 8), Endpoint("b", "r", 8, 8)
    times = _arrival(env, net.transfer(a, b, 0))
    env.run()
    assert times == [pytest.approx(1000 / 1e6)]


@pytest.mark.parametrize("sharing", ["maxmin", "equal"])
def test_window_caps_a_stream_at_window_over_rtt(sharing: str):
    # 100 Mb/s links, 50 ms one way: RTT 0.1 s, a 256 KiB window gives 2.62 MB/s < 12.5 MB/s of the links
    window, latency = 256 * 1024, 0.05
    tcp = TcpModel(window_bytes=window, slow_start_after_idle=False, **NO_FRAMING)
    env, net = _tcp_net(latency, tcp, sharing)
    a, b = Endpoint("a", "r", 100, 100), Endpoint("b", "r", 100, 100)
    size = 10_000_000
    flow = net.transfer(a, b, size)
    times = _arrival(env, flow)
    cap = window / (2 * latency)
    assert flow.rate == pytest.approx(cap)
    env.run()
    expected = slow_start_delay(size, cap, 2 * latency) + size / cap + latency
    assert times == [pytest.approx(expected)]


def test_a_cap_above_the_fair_share_changes_nothing():
    # 80 Mb/s (10 MB/s) uplink, RTT 0.1 s, window 0.2 MB: each stream is capped at 2 MB/s
    tcp = TcpModel(window_bytes=200_000, **NO_FRAMING)
    env, net = _tcp_net(0.05, tcp)
    a = Endpoint("a", "r", 80, 1000)
    flows = [net.transfer(a, Endpoint(n, "r", 1000, 1000), 1_000_000) for n in "bcdefg"]
    # six flows: the fair share 10/6 MB/s is below the 2 MB/s cap, so the link is shared equally
    assert [f.rate for f in flows] == [pytest.approx(10e6 / 6)] * 6
    env.run()


def test_progressive_filling_freezes_capped_flows_first():
    # a 10 MB/s uplink; flow 1 to a far peer (RTT 1 s, cap 1 MB/s), flow 2 to a near one (RTT 0: no cap)
    env = simpy.Environment()
    tcp = TcpModel(window_bytes=1_000_000, **NO_FRAMING)
    net = Network(env, lambda x, y: 0.5 if "far" in (x, y) else 0.0, 0.0, random.Random(0), "maxmin", tcp)
    a = Endpoint("a", "near", 80, 1000)
    far = net.transfer(a, Endpoint("f", "far", 1000, 1000), 5_000_000)
    near = net.transfer(a, Endpoint("n", "near", 1000, 1000), 5_000_000)
    assert far.rate == pytest.approx(1e6) and near.rate == pytest.approx(9e6)
    env.run()


def test_slow_start_delay_follows_its_formula():
    w, rtt, rate = INITIAL_WINDOW_BYTES, 0.1, 10e6  # 1 MB per RTT at full rate: ceil(log2(1e6 / w)) = 7 rounds to full rate
    assert slow_start_delay(100_000, rate, 0.0) == 0.0
    assert slow_start_delay(100_000, 1e5, rtt) == 0.0  # a window of w already fills 10 kB per RTT
    # 100 kB: windows w, 2w, 4w (7 w = 101 kB): it is out in the third round, after k = 2 waits
    assert slow_start_delay(100_000, rate, rtt) == pytest.approx(2 * rtt - w * (2**2 - 1) / rate)
    # 10 MB: all 7 rounds to full rate
    assert slow_start_delay(10_000_000, rate, rtt) == pytest.approx(7 * rtt - w * (2**7 - 1) / rate)


def test_first_message_pays_slow_start_and_a_busy_connection_does_not():
    tcp = TcpModel(window_bytes=1e12, slow_start_after_idle=True, **NO_FRAMING)
    env, net = _tcp_net(0.05, tcp)
    a, b = Endpoint("a", "r", 80, 80), Endpoint("b", "r", 80, 80)  # 10 MB/s
    size, rtt, rate = 2_000_000, 0.1, 10e6
    first = _arrival(env, net.transfer(a, b, size))
    env.run(until=0.01)
    second = _arrival(env, net.transfer(a, b, size))  # the connection is busy: no slow start of its own
    env.run()
    # alone until 0.01 (0.1 MB), then 5 MB/s each: the first one's bytes are out at 0.01 + 1.9 MB / 5 MB/s, and its
    # slow-start delay is added to its delivery; the second one's last 0.1 MB then go at the full 10 MB/s
    first_out = 0.01 + (size - 0.01 * rate) / (rate / 2)
    assert first == [pytest.approx(first_out + 0.05 + slow_start_delay(size, rate, rtt))]
    assert second == [pytest.approx(first_out + (size - (first_out - 0.01) * rate / 2) / rate + 0.05)]


def test_slow_start_restarts_after_an_idle_rto_only_when_enabled():
    def arrival_of_second(after_idle: bool, gap: float) -> float:
        tcp = TcpModel(window_bytes=1e12, slow_start_after_idle=after_idle, **NO_FRAMING)
        env, net = _tcp_net(0.05, tcp)
        a, b = Endpoint("a", "r", 80, 80), Endpoint("b", "r", 80, 80)
        net.transfer(a, b, 1_000_000)  # delivered at 0.1 + its slow-start delay + 0.05
        env.run()
        start = env.now + gap
        env.run(until=start)
        times = _arrival(env, net.transfer(a, b, 1_000_000))
        env.run()
        return times[0] - start

    plain = 1_000_000 / 10e6 + 0.05
    restart = slow_start_delay(1_000_000, 10e6, 0.1)
    rto = 0.05 + RTO_MIN_S  # RTT / 2 + RTO_MIN after the first message was delivered
    assert arrival_of_second(True, rto + 0.1) == pytest.approx(plain + restart)
    assert arrival_of_second(True, 0.01) == pytest.approx(plain)  # idle shorter than an RTO
    assert arrival_of_second(False, rto + 0.1) == pytest.approx(plain)


def test_the_software_rate_caps_a_flow_where_the_link_is_faster():
    """The live stack moves payload at most at its software rate, pipelined with the link: on a slow link nothing
    changes, on a fast one the software rate is the bottleneck (``tools/bench_wire.py``: both measured)."""
    def arrival(mbps: float) -> float:
        tcp = TcpModel(window_bytes=1e12, software_bytes_per_s=50e6, slow_start_after_idle=False,
                       message_overhead_bytes=0.0, byte_overhead=1.05)
        env, net = _tcp_net(0.0, tcp)
        times = _arrival(env, net.transfer(Endpoint("a", "r", mbps, mbps), Endpoint("b", "r", mbps, mbps), 1_000_000))
        env.run()
        return times[0]

    assert arrival(8) == pytest.approx(1.05 * 1_000_000 / 1e6)  # 1 MB/s link: link-bound
    assert arrival(8000) == pytest.approx(1_000_000 / 50e6)  # 1 GB/s link: the software's 50 MB/s of payload


def test_a_path_rtt_of_its_own_replaces_twice_the_latency_for_window_and_slow_start():
    """The lab's latency is injected per message, off the path: TCP sees the lab's own RTT (``sim.tcp_rtt_ms``)."""
    window, latency, path_rtt = 256 * 1024, 0.05, 0.001
    tcp = TcpModel(window_bytes=window, path_rtt_s=path_rtt, **NO_FRAMING)
    env, net = _tcp_net(latency, tcp)
    a, b = Endpoint("a", "r", 8, 8), Endpoint("b", "r", 8, 8)  # 1 MB/s: below the window cap at 1 ms
    flow = net.transfer(a, b, 1_000_000)
    times = _arrival(env, flow)
    assert flow.rate == pytest.approx(1e6)  # window / 0.1 s (2.6 MB/s) would not cap it either; / 1 ms: 262 MB/s
    env.run()
    assert times == [pytest.approx(latency + 1.0 + slow_start_delay(1_000_000, 1e6, path_rtt))]


def test_transport_model_refuses_per_link_sharing():
    with pytest.raises(ValueError, match="per_link"):
        _tcp_net(0.0, TcpModel(window_bytes=1e6, **NO_FRAMING), "per_link")


def test_an_rpc_pays_the_transport_models_fixed_overhead_once():
    from dataclasses import dataclass

    from node0sim.sim.engine import Simulation
    from node0sim.sim.gpus import gpu_profile

    @dataclass
    class Blob:
        nbytes: int

        def wire_bytes(self) -> int:
            return self.nbytes

    tcp = TcpModel(window_bytes=1e12, slow_start_after_idle=False, **NO_FRAMING)
    sim = Simulation(seed=0, latency_s=lambda a, b: 0.01, dht_latency_s=0.0, transport=tcp, rpc_overhead_s=0.003)
    peers = [sim.add_peer(n, region="r", up_mbps=8, down_mbps=8, gpu=gpu_profile("rtx3090"), utilization=0.4) for n in "ab"]

    async def echo(_caller, request):
        return Blob(request.nbytes)

    peers[1].runtime.serve("echo", echo)

    async def call():
        await peers[0].runtime.call("b", "echo", Blob(100_000), timeout=10)
        return peers[0].runtime.now()

    task = peers[0].runtime.spawn(call())
    sim.run()
    # overhead, then each way 0.1 MB at 1 MB/s + 10 ms, on a cold connection (a->b, then b->a): one slow-start round each
    assert task.process.value == pytest.approx(0.003 + 2 * (0.1 + 0.01 + slow_start_delay(100_000, 1e6, 0.02)))


def test_transport_keys_are_validated_naming_the_key():
    from node0sim.app import compose_run_config
    from node0sim.config import ConfigError

    with pytest.raises(ConfigError, match="sim.transport"):
        compose_run_config("sim.transport=quic")
    with pytest.raises(ConfigError, match="sim.transport=tcp needs sim.link_sharing"):
        compose_run_config("sim.transport=tcp", "sim.link_sharing=per_link")
    with pytest.raises(ConfigError, match="sim.tcp_byte_overhead"):
        compose_run_config("sim.tcp_byte_overhead=0.5")
    with pytest.raises(ConfigError, match="sim.tcp_software_mb_per_s"):
        compose_run_config("sim.tcp_software_mb_per_s=0")
    with pytest.raises(ConfigError, match="sim.tcp_rtt_ms"):
        compose_run_config("sim.tcp_rtt_ms=-1")


def test_fluid_runs_build_no_transport_model_and_tcp_runs_take_the_configured_constants():
    from node0sim.app import compose_run_config
    from node0sim.sim.runner import build_simulation
    from tests.runs import MINIMAL

    assert build_simulation(compose_run_config(MINIMAL)).network.transport is None
    sim = build_simulation(compose_run_config(MINIMAL, "sim.transport=tcp", "sim.tcp_window_kib=64", "sim.tcp_rpc_overhead_ms=5",
                                              "sim.tcp_software_mb_per_s=100", "sim.tcp_rtt_ms=2"))
    transport = sim.network.transport
    assert transport.window_bytes == 64 * 1024 and sim.rpc_overhead_s == pytest.approx(0.005)
    assert transport.software_bytes_per_s == pytest.approx(100e6) and transport.path_rtt_s == pytest.approx(0.002)
    assert build_simulation(compose_run_config(MINIMAL, "sim.transport=tcp")).network.transport.path_rtt_s is None


@pytest.mark.parametrize("seed", range(20))
def test_progressive_filling_gives_the_max_min_fair_rates_on_random_flow_sets(seed: int):
    # the max-min fair allocation is the unique feasible one where every flow has a bottleneck: its own cap, or a
    # saturated link on which no flow gets more than it does
    rng = random.Random(seed)
    peers = [Endpoint(f"p{i}", "r", rng.choice([10, 40, 80, 1000]), rng.choice([10, 80, 200])) for i in range(rng.randint(2, 12))]
    env = simpy.Environment()
    flows = {}
    for _ in range(rng.randint(1, 40)):
        src, dst = rng.sample(peers, 2)
        cap = rng.choice([math.inf, math.inf, rng.uniform(0.1e6, 5e6)])
        flow = Flow(src.up, dst.down, 1e6, 0.0, env.event(), 0.0, cap)
        src.up.flows[flow] = dst.down.flows[flow] = None
        flows[flow] = None
    links = {link: None for flow in flows for link in (flow.up, flow.down)}
    rates = Network._max_min_rates(links, flows)
    assert rates.keys() == flows.keys()
    tol = 1e-9
    for link in links:
        assert sum(rates[f] for f in link.flows) <= link.capacity * (1 + tol)
    for flow, rate in rates.items():
        assert 0 < rate <= flow.cap * (1 + tol)
        bottlenecks = [
            link for link in (flow.up, flow.down)
            if sum(rates[f] for f in link.flows) >= link.capacity * (1 - tol) and all(rates[f] <= rate * (1 + tol) for f in link.flows)
        ]
        assert rate >= flow.cap * (1 - tol) or bottlenecks, f"flow of rate {rate} has no bottleneck"
