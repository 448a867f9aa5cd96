"""The SimPy runtime: async protocol code on virtual time, RPC, failures, DHT, compute."""

from dataclasses import dataclass

import pytest

from node0sim.app import compose_run_config
from node0sim.runtime import RemoteError, RequestTimeout, RPCError
from node0sim.sim.engine import EmulatedDHT
from node0sim.sim.runner import dense_activation_bytes_per_token
from tests.runs import simulate
from tests.simutil import add, make_sim


@dataclass
class Blob:
    nbytes: int

    def wire_bytes(self) -> int:
        return self.nbytes


def _run(sim, peer, coro):
    task = peer.runtime.spawn(coro)
    sim.run()
    assert task.done
    return task.process.value


def test_sleep_and_exceptions_reach_protocol_code_in_virtual_time():
    sim = make_sim(dht_latency_s=0.05)
    peer = add(sim, "p")
    rt = peer.runtime

    async def protocol():
        await rt.sleep(2.5)
        try:
            await rt.call("nobody", "x", Blob(1), timeout=10.0)
        except RPCError as error:
            return rt.now(), error

    now, error = _run(sim, peer, protocol())
    assert now == pytest.approx(2.5 + 0.05)  # an id no peer has: one DHT lookup finds no address
    assert type(error) is RPCError and "nobody: no address found" in str(error)  # not a refusal, not a timeout


@pytest.mark.parametrize("pair_streams", ["shared", "serial"])
def test_messages_sent_together_share_the_links_or_go_one_after_another(pair_streams):
    latency, mbps, nbytes = 0.05, 80, 1_000_000
    sim = make_sim(latency_s=latency, pair_streams=pair_streams)
    client, server = add(sim, "client", mbps, mbps), add(sim, "server", mbps, mbps)
    server.runtime.serve("put", lambda caller, request: _ack())
    arrivals = []

    async def send():
        await client.runtime.call("server", "put", Blob(nbytes), timeout=60)
        arrivals.append(client.runtime.now())

    async def protocol():
        await client.runtime.gather([client.runtime.spawn(send()) for _ in range(3)])

    _run(sim, client, protocol())
    transfer = 8 * nbytes / (mbps * 1e6)
    reply = latency + 8 * 1 / (mbps * 1e6)  # the 1-byte ack, back on its own direction
    if pair_streams == "shared":  # fair shares of the uplink: all three finish together
        expected = [latency + 3 * transfer + reply] * 3
    else:  # one at a time, each holding the stream for its bytes and latency (ProtocolNanoGPT's meter)
        expected = [k * (transfer + latency) + reply for k in (1, 2, 3)]
    assert arrivals == pytest.approx(expected)


async def _ack():
    return Blob(1)


def test_rpc_time_is_request_plus_compute_plus_response():
    sim = make_sim(latency_s=0.01)
    client, server = add(sim, "client", 80, 80), add(sim, "server", 80, 80)
    flops = 1e12

    async def handler(caller, request):
        await server.runtime.compute(flops)
        return Blob(2_000_000)

    server.runtime.serve("work", handler)

    async def protocol():
        response = await client.runtime.call("server", "work", Blob(1_000_000), timeout=60)
        return response.nbytes, client.runtime.now()

    nbytes, elapsed = _run(sim, client, protocol())
    expected = (0.01 + 8e6 / 80e6) + flops / (71e12 * 0.4) + (0.01 + 16e6 / 80e6)
    assert nbytes == 2_000_000 and elapsed == pytest.approx(expected)


def test_call_to_departed_peer_fails_after_its_timeout():
    sim = make_sim(latency_s=0.01)
    client, server = add(sim, "client"), add(sim, "server")

    async def handler(caller, request):
        return Blob(10)

    server.runtime.serve("ping", handler)
    server.crash()

    async def protocol():
        start = client.runtime.now()
        with pytest.raises(RequestTimeout, match="server"):
            await client.runtime.call("server", "ping", Blob(10), timeout=3.0)
        return client.runtime.now() - start

    assert _run(sim, client, protocol()) == pytest.approx(3.0)


def _server_failing_mid_request(reset_connections: bool, latency: float = 0.0) -> tuple:
    """A client, and a server that crashes (``reset_connections``: is killed on a live host) 1 s into a 5 s request."""
    sim = make_sim(latency_s=latency)
    client, server = add(sim, "client"), add(sim, "server")
    handled = []

    async def slow(caller, request):
        await server.runtime.sleep(5.0)
        handled.append(True)
        return Blob(1)

    server.runtime.serve("slow", slow)

    async def fail_later():
        await client.runtime.sleep(1.0)
        server.crash(reset_connections=reset_connections)

    client.runtime.spawn(fail_later())
    return sim, client, handled


def test_peer_crashing_mid_request_makes_the_caller_time_out():
    sim, client, handled = _server_failing_mid_request(reset_connections=False)

    async def protocol():
        with pytest.raises(RequestTimeout):
            await client.runtime.call("server", "slow", Blob(1), timeout=10.0)
        return client.runtime.now()

    assert _run(sim, client, protocol()) == pytest.approx(10.0)
    assert handled == []  # the crashed peer's handler never finished


def test_calls_to_a_killed_peer_fail_once_the_reset_crossed_the_network():
    """A process killed on a live host: its kernel resets the connection of a call in progress (the caller hears it
    after one one-way latency) and refuses later dials (one round trip), long before any timeout."""
    latency = 0.02
    sim, client, handled = _server_failing_mid_request(reset_connections=True, latency=latency)

    async def protocol():  # a plain RPCError, as a live backend's: not a refusal, the request may have run
        with pytest.raises(RPCError, match="server: connection reset") as in_flight:
            await client.runtime.call("server", "slow", Blob(1), timeout=10.0)
        in_progress = client.runtime.now()
        with pytest.raises(RPCError, match="connection reset") as dialed:
            await client.runtime.call("server", "slow", Blob(1), timeout=10.0)
        assert not isinstance(in_flight.value, RemoteError) and not isinstance(dialed.value, RemoteError)
        return in_progress, client.runtime.now() - in_progress

    assert _run(sim, client, protocol()) == pytest.approx((1.0 + latency, 2 * latency))
    assert handled == []


def test_rejected_request_raises_remote_error_with_the_reason():
    sim = make_sim()
    client, server = add(sim, "client"), add(sim, "server")

    async def picky(caller, request):
        raise ValueError("tensor has NaN")

    server.runtime.serve("picky", picky)

    async def protocol():
        with pytest.raises(RemoteError, match="NaN"):
            await client.runtime.call("server", "picky", Blob(1), timeout=5.0)
        with pytest.raises(RemoteError, match="does not serve"):
            await client.runtime.call("server", "unknown", Blob(1), timeout=5.0)
        return True

    assert _run(sim, client, protocol())


def test_oversized_message_is_refused_before_sending():
    sim = make_sim()
    client, _ = add(sim, "client"), add(sim, "server")
    sim.max_message_bytes = 1000

    async def protocol():
        with pytest.raises(ValueError, match="message limit"):
            await client.runtime.call("server", "x", Blob(1001), timeout=5.0)
        return sim.network.bytes_sent

    assert _run(sim, client, protocol()) == 0


def test_dht_values_expire_and_subkeys_merge():
    sim = make_sim(dht_latency_s=0.1)
    a, b = add(sim, "a"), add(sim, "b")

    async def protocol():
        await a.runtime.dht_store("k", "v", expires_in=5.0)
        await a.runtime.dht_store("stage", 1, expires_in=5.0, per_peer=True)
        await b.runtime.dht_store("stage", 2, expires_in=50.0, per_peer=True)
        first = (await b.runtime.dht_get("k"), await b.runtime.dht_get("stage"))
        await b.runtime.sleep(10)
        second = (await b.runtime.dht_get("k"), await b.runtime.dht_get("stage"))
        return first, second, b.runtime.now()

    first, second, now = _run(sim, a, protocol())
    assert first == ("v", {"a": 1, "b": 2})
    assert second == (None, {"b": 2})
    assert now == pytest.approx(10.7)  # 7 DHT operations of 0.1 s + 10 s


def test_dht_answers_stand_until_a_store_or_the_first_expiry():
    dht = EmulatedDHT(lookup_latency_s=0.0)
    dht.store("stage", "a", 1, expires_at=5.0)
    dht.store("stage", "b", 2, expires_at=50.0)
    first = dht.get("stage", now=1.0)
    assert first == {"a": 1, "b": 2} and dht.get("stage", now=4.9) is first  # nothing changed: the same answer
    assert dht.get("stage", now=5.0) == {"b": 2}  # "a" expired
    dht.store("stage", "c", 3, expires_at=60.0)
    assert dht.get("stage", now=6.0) == {"b": 2, "c": 3}  # a store is seen at once
    dht.store("stage", "b", None, expires_at=0.0)
    assert dht.get("stage", now=6.0) == {"c": 3}  # so is a withdrawal
    assert dht.get("stage", now=60.0) is None


def test_compute_is_serialized_on_one_gpu_and_runs_the_function():
    sim = make_sim()
    peer = add(sim, "p")
    rt = peer.runtime
    seconds_per_job = 1e12 / peer.flops_per_s

    async def job(i):
        value = await rt.compute(1e12, lambda: i * i)
        return value, rt.now()

    async def protocol():
        return await rt.gather([rt.spawn(job(i)) for i in range(3)])

    results = _run(sim, peer, protocol())
    assert [v for v, _ in results] == [0, 1, 4]
    assert [t for _, t in results] == pytest.approx([seconds_per_job * k for k in (1, 2, 3)])


def test_awaiting_a_foreign_awaitable_fails_clearly():
    import asyncio

    sim = make_sim()
    peer = add(sim, "p")

    async def bad():
        await asyncio.sleep(0)

    peer.runtime.spawn(bad())
    with pytest.raises(TypeError, match="only runtime awaitables"):
        sim.run()


def test_jitter_is_seeded():
    def arrival(seed):
        sim = make_sim(latency_s=0.01, seed=seed, jitter_s=0.02)
        client, server = add(sim, "c"), add(sim, "s")

        async def echo(caller, request):
            return Blob(1)

        server.runtime.serve("echo", echo)

        async def protocol():
            for _ in range(5):
                await client.runtime.call("s", "echo", Blob(1), timeout=5)
            return client.runtime.now()

        return _run(sim, client, protocol())

    assert arrival(1) == arrival(1) != arrival(2)


def test_future_wakes_waiters_and_times_out():
    sim = make_sim()
    peer = add(sim, "p")
    rt = peer.runtime
    fut, never = rt.future(), rt.future()

    async def setter():
        await rt.sleep(2.0)
        fut.set_result("ready")
        fut.set_result("ignored")

    async def protocol():
        rt.spawn(setter())
        value = await fut.wait(timeout=5.0)
        at = rt.now()
        with pytest.raises(TimeoutError):
            await never.wait(timeout=1.5)
        return value, at, rt.now(), await fut.wait()

    assert _run(sim, peer, protocol()) == ("ready", 2.0, 3.5, "ready")


def test_a_simulation_dropped_with_tasks_still_waiting_closes_them_quietly():
    import gc
    import sys

    raised = []
    previous, sys.unraisablehook = sys.unraisablehook, raised.append
    try:
        sim = make_sim()
        peer = add(sim, "p")

        async def forever(rt):
            while True:
                await rt.sleep(1.0)

        peer.runtime.spawn(forever(peer.runtime))
        sim.run(until=3.5)
        del sim, peer
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert raised == []  # regression: the driver used to resume a closed coroutine on GeneratorExit


@pytest.mark.parametrize("caller_leaves", ["times_out", "crashes", "is_cancelled"])
def test_a_caller_leaving_mid_request_lets_the_handler_finish_and_drops_the_reply(caller_leaves):
    sim = make_sim(latency_s=0.01)
    client, server = add(sim, "client"), add(sim, "server")
    handled = []

    async def slow(caller, request):
        await server.runtime.sleep(5.0)
        handled.append(server.runtime.now())
        return Blob(1000)

    server.runtime.serve("slow", slow)
    outcome = []

    async def protocol():
        try:
            await client.runtime.call("server", "slow", Blob(1), timeout=2.0)
        except RequestTimeout:
            outcome.append(("timeout", client.runtime.now()))
            await client.runtime.sleep(10.0)  # still waiting elsewhere when the handler ends
            outcome.append(("after", client.runtime.now()))

    async def crash_later():
        await server.runtime.sleep(1.0)
        client.crash()

    async def cancel_later(task):  # as a trainer cancels a hedged call's loser
        await client.runtime.sleep(1.0)
        task.cancel()

    caller = client.runtime.spawn(protocol())
    if caller_leaves == "crashes":
        server.runtime.spawn(crash_later())
    if caller_leaves == "is_cancelled":
        client.runtime.spawn(cancel_later(caller))
    sim.run()
    assert handled == [pytest.approx(5.01)]  # the server finished the work it was given
    assert sim.traffic["slow"] == 1  # but sent no reply
    if caller_leaves == "times_out":
        assert outcome == [("timeout", pytest.approx(2.0)), ("after", pytest.approx(12.0))]
    else:
        assert outcome == []


def test_many_calls_time_out_exactly_at_their_own_deadlines():
    sim = make_sim(latency_s=0.01)
    client, server = add(sim, "client"), add(sim, "server")
    server.crash()
    ends = {}

    async def one(timeout, delay):
        await client.runtime.sleep(delay)
        start = client.runtime.now()
        with pytest.raises(RequestTimeout):
            await client.runtime.call("server", "x", Blob(1), timeout=timeout)
        ends[(timeout, delay)] = client.runtime.now() - start

    cases = [(5.0, 0.0), (1.0, 0.3), (3.0, 0.1), (0.7, 2.0), (1e-3, 0.05)]
    for timeout, delay in cases:
        client.runtime.spawn(one(timeout, delay))
    sim.run()
    assert ends == {case: pytest.approx(case[0], abs=1e-9) for case in cases}


def test_the_dense_twin_of_a_node0_size_run_is_one_micro_batch(tmp_path):
    # experiment=scale_bench (1024-sample steps of 8B activations on 80 Mb/s): one dense step from one trainer failed the
    # memory check and timed out every request; the twin sends one micro-batch, whose bytes per token are a dense run's
    run = compose_run_config("experiment=scale_bench", "topology.peers_per_stage=1")
    dense = simulate(
        tmp_path, "experiment=scale_bench", "topology.peers_per_stage=1", "compression=none", "churn=none",
        "topology.num_trainers=1", "train.steps=1", "train.batch_size=1", "train.schedule=sync", "train.max_sim_time_s=null",
        "train.eval_batches=0",
    )
    assert dense["steps"] == 1
    assert dense_activation_bytes_per_token(run) == dense["activation_bytes_per_token"]
