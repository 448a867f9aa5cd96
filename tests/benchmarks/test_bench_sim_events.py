"""pytest-benchmark: cost per simulated protocol event vs raw SimPy (``make bench``; compare the groups' means)."""

import pytest

from tools.bench_events import raw_simpy_timeouts, runtime_rpcs, runtime_sleeps

pytestmark = pytest.mark.benchmark


@pytest.mark.benchmark(group="sim-events")
def test_raw_simpy_timeouts(benchmark):
    assert benchmark(raw_simpy_timeouts, 200, 100) == 20_000


@pytest.mark.benchmark(group="sim-events")
def test_protocol_sleeps_through_runtime(benchmark):
    assert benchmark(runtime_sleeps, 200, 100) == 20_000


@pytest.mark.benchmark(group="sim-rpc")
def test_protocol_rpc_round_trips(benchmark):
    rpcs, _ = benchmark(runtime_rpcs, 20, 10)
    assert rpcs == 200


def test_rpc_schedules_a_bounded_number_of_events():
    rpcs, events = runtime_rpcs(5, 4)
    assert rpcs == 20 and rpcs * 5 <= events <= rpcs * 20
