"""Stage records: typed, never crash a reader when malformed; the progress tracker's view of a stage."""

import math

import pytest
import torch

from node0sim.model import build_stages
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.progress import ProgressTracker, StageRecord, parse_stage, read_stages, stage_key
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.trainer import Trainer, TrainerConfig
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG

RECORD = StageRecord(epoch=3, samples=40, rate=2.5, time=10.0, throughput=7.0, bandwidth=100.0, ready=True, averaging=None)


def _run(sim, peer, coroutine):
    task = peer.runtime.spawn(coroutine)
    sim.run(until=task.process)
    return task.process.value


# ---- StageRecord ------------------------------------------------------------------------------

def test_record_round_trips_through_its_dht_value():
    value = RECORD.to_dht()
    assert value == {"epoch": 3, "samples": 40, "rate": 2.5, "time": 10.0, "throughput": 7.0, "bandwidth": 100.0,
                     "ready": True, "averaging": None}
    assert StageRecord.from_dht(value) == RECORD
    averaging = StageRecord(**{**value, "averaging": 3, "time": 0, "throughput": 1})  # ints are fine for floats
    assert StageRecord.from_dht(averaging.to_dht()) == averaging


@pytest.mark.parametrize("value", [
    None, "record", 3, [1, 2], (), {},
    {k: v for k, v in RECORD.to_dht().items() if k != "averaging"},  # a field missing
    {**RECORD.to_dht(), "extra": 1},
    {**RECORD.to_dht(), "epoch": "3"}, {**RECORD.to_dht(), "epoch": True}, {**RECORD.to_dht(), "epoch": -1},
    {**RECORD.to_dht(), "epoch": 3.0}, {**RECORD.to_dht(), "samples": None}, {**RECORD.to_dht(), "samples": 1.5},
    {**RECORD.to_dht(), "rate": math.nan}, {**RECORD.to_dht(), "time": math.inf}, {**RECORD.to_dht(), "throughput": "7"},
    {**RECORD.to_dht(), "bandwidth": False}, {**RECORD.to_dht(), "bandwidth": [1.0]},
    {**RECORD.to_dht(), "ready": 1}, {**RECORD.to_dht(), "ready": None},
    {**RECORD.to_dht(), "averaging": "3"}, {**RECORD.to_dht(), "averaging": True}, {**RECORD.to_dht(), "averaging": -2},
    {**RECORD.to_dht(), "averaging": 2.0},
    {**RECORD.to_dht(), "time": 10**400}, {**RECORD.to_dht(), "samples": 10**400}, {**RECORD.to_dht(), "rate": -(2**60)},
])
def test_a_malformed_value_is_no_record(value):
    assert StageRecord.from_dht(value) is None


def test_parse_stage_keeps_the_well_formed_records_in_order():
    value = {"b": RECORD.to_dht(), "x": {"epoch": "junk"}, "a": RECORD.to_dht(), "gone": None, "y": "junk"}
    assert list(parse_stage(value)) == ["b", "a"]
    assert parse_stage(None) == {} and parse_stage("junk") == {} and parse_stage([RECORD.to_dht()]) == {}


def test_parse_stage_parses_a_value_once_and_a_new_value_anew():
    value = RECORD.to_dht()
    first, again = parse_stage({"a": value}), parse_stage({"a": value, "b": value})
    assert again["a"] is again["b"] is first["a"]  # the same object read again: parsed once
    changed = {**value, "ready": "yes"}
    assert parse_stage({"a": changed}) == {} and parse_stage({"a": dict(value)})["a"] is not first["a"]


def test_samples_at_extrapolates_at_the_rate():
    assert RECORD.samples_at(14.0) == 40 + 2.5 * 4.0


# ---- ProgressTracker --------------------------------------------------------------------------

def _trackers(names, target=100, period=1.0):
    sim = make_sim(dht_latency_s=0.01)
    peers = {name: add(sim, name) for name in names}
    cfg = AveragingConfig(target, progress_period_s=period)
    trackers = {name: ProgressTracker(peer.runtime, "run", 0, cfg, throughput=5.0, bandwidth_mbps=50.0)
                for name, peer in peers.items()}
    return sim, peers, trackers


def test_tracker_reports_its_progress_and_sees_only_the_other_ready_peers():
    sim, peers, trackers = _trackers(["a", "b", "c"])
    a, b, c = trackers["a"], trackers["b"], trackers["c"]
    a.ready = b.ready = True  # c is a joiner still downloading

    async def protocol():
        a.count(10)
        await peers["a"].runtime.sleep(2.0)
        for tracker in (a, b, c):
            await tracker.report()
        await a.refresh()
        return a.records, a.others()

    records, others = _run(sim, peers["a"], protocol())
    assert set(records) == {"a", "b", "c"} and set(others) == {"b"}
    mine = records["a"]
    assert (mine.epoch, mine.samples, mine.ready, mine.averaging, mine.throughput, mine.bandwidth) == (0, 10, True, None, 5.0, 50.0)
    assert mine.rate == pytest.approx(0.5 * 10 / mine.time)  # half the last estimate (0), half the rate since


def test_tracker_rate_is_an_exponential_average_over_reports():
    sim, peers, trackers = _trackers(["a"])
    a = trackers["a"]
    rt = peers["a"].runtime

    async def protocol():
        rates = []
        for samples in (20, 0, 40):
            await rt.sleep(1.0)
            a.count(samples)
            await a.report()
            await a.refresh()
            rates.append((a.records["a"].rate, a.records["a"].time))
        return rates

    (r1, t1), (r2, t2), (r3, t3) = _run(sim, peers["a"], protocol())
    assert r1 == pytest.approx(0.5 * 20 / t1)
    assert r2 == pytest.approx(0.5 * r1)
    assert r3 == pytest.approx(0.5 * r2 + 0.5 * 40 / (t3 - t2))


def test_tracker_answers_the_epoch_questions_from_the_last_read():
    sim, peers, trackers = _trackers(["a", "b"], target=100)
    a, b = trackers["a"], trackers["b"]
    a.ready = b.ready = True

    async def view(b_epoch, b_samples, b_ending, a_samples=0):
        b.epoch, b.samples, b.ending_epoch = b_epoch, b_samples, b_epoch if b_ending else None
        a.samples = a_samples
        await b.report()
        await a.refresh()
        return (a.global_epoch(), a.newest_epoch(), a.newest_epoch_is_averaging(), a.epoch_due(), a.next_check_in())

    async def protocol():
        views = [await view(0, 10, False, 20), await view(0, 10, True), await view(2, 0, False), await view(0, 90, False, 20)]
        await a.refresh()
        estimated = a.estimated_samples()
        await peers["a"].runtime.sleep(0.5)
        a.count(40)
        await a.report()  # a's rate is now known: 40 samples in about half a second, half-weighted
        return views, estimated, a.next_check_in()

    (same, averaging, ahead, reached), estimated, check_in = _run(sim, peers["a"], protocol())
    assert same[:4] == (0, 0, False, False)
    assert averaging[:4] == (0, 0, True, True)  # b is averaging this epoch: join it
    assert ahead[:4] == (2, 2, False, True)
    assert reached[3] and estimated == 110  # 20 here and 90 at b (no rate: not extrapolated)
    assert [v[4] for v in (same, averaging, ahead, reached)] == [1.0] * 4  # no rate known: one progress period
    assert check_in == pytest.approx(0.01)  # the target is passed: check again (almost) at once


def test_tracker_without_others_and_after_a_withdrawal():
    sim, peers, trackers = _trackers(["a", "b"], period=1.0)
    a, b = trackers["a"], trackers["b"]
    a.ready = b.ready = True
    a.epoch = 4

    async def protocol():
        await b.report()
        await a.refresh()
        seen = set(a.others())
        await b.withdraw()
        await a.refresh()
        return seen, a.others(), a.global_epoch(), a.newest_epoch(), a.newest_epoch_is_averaging(), a.next_check_in()

    seen, others, global_epoch, newest, averaging, check_in = _run(sim, peers["a"], protocol())
    assert seen == {"b"} and others == {}
    assert (global_epoch, newest, averaging) == (4, -1, False)
    assert check_in == 1.0  # no rate known: one progress period


def test_tracker_is_alone_only_a_record_lifetime_after_it_last_saw_another_peer():
    sim, peers, trackers = _trackers(["a", "b"], period=1.0)
    a, b = trackers["a"], trackers["b"]
    a.ready = b.ready = True
    rt = peers["a"].runtime
    lifetime = a.record_lifetime_s  # three progress periods

    async def protocol():
        alone = [a.alone()]  # nobody seen yet
        await b.report()
        await a.refresh()
        await b.withdraw()
        await a.refresh()  # b gone from the reads: not alone for a record's lifetime after the read that had it
        alone.append(a.alone())
        await rt.sleep(lifetime)
        alone.append(a.alone())
        a.saw(["a", "b"])  # b averaged with a: evidence it is alive, as a read of its record
        alone.append(a.alone())
        await rt.sleep(lifetime + 0.01)
        alone.append(a.alone())
        return alone

    assert _run(sim, peers["a"], protocol()) == [True, False, True, False, True]


def test_read_stages_reads_every_stage_and_drops_malformed_records():
    sim = make_sim(dht_latency_s=0.05)
    peer = add(sim, "a")
    rt = peer.runtime

    async def protocol():
        # records as the DHT may hold them: one peer's good one, two others' malformed ones
        sim.dht.store(stage_key("run", 0), "good", RECORD.to_dht(), 10)
        sim.dht.store(stage_key("run", 0), "bad", {"epoch": "x"}, 10)
        sim.dht.store(stage_key("run", 2), "worse", "junk", 10)
        started = rt.now()
        stages = await read_stages(rt, "run", 3)
        return stages, rt.now() - started

    stages, took = _run(sim, peer, protocol())
    assert stages == [{"good": RECORD}, {}, {}]
    assert took == pytest.approx(0.05)  # the stages are read concurrently


# ---- a malformed record in a running swarm ----------------------------------------------------

def test_malformed_records_crash_neither_a_server_nor_a_trainer():
    sim = make_sim(latency_s=0.005)
    server_peer, trainer_peer = add(sim, "server"), add(sim, "trainer")
    compute = TensorStageCompute(build_stages(CFG, 1, seed=0)[0], OptimConfig(), DenseCodec())
    server = StageServer(server_peer.runtime, "run", compute, AveragingConfig(8, progress_period_s=0.1),
                         throughput=1.0, bandwidth_mbps=100)
    batch = torch.randint(0, CFG.vocab_size, (2, 9))

    class Repeat:
        def next_micro_batch(self):
            return batch[:, :-1], batch[:, 1:]

    trainer = Trainer(trainer_peer.runtime, "run", 1, Repeat(),
                      TrainerConfig(micro_batches=20, micro_batches_per_step=1, schedule="async"), lambda record: None)
    malformed = (("junk", "junk"), ("half", {"ready": True, "throughput": 9.0}), ("typed", {**RECORD.to_dht(), "ready": "yes"}))
    for vandal, value in malformed:  # three vandals' own entries
        sim.dht.store(stage_key("run", 0), vandal, value, 100)
    server_peer.runtime.spawn(server.start())
    _run(sim, trainer_peer, trainer.run())
    assert trainer.stats.micro_batches_done == 20
    assert server.stats.epochs == 20 * 2 // 8 and server.stats.solo_steps == server.stats.epochs
    assert set(server.progress.records) == {"server"}


# ---- a DHT that lags ------------------------------------------------------------------------

def _lagging_reads(rt, key: str, outage: tuple[float, float]):
    """``rt.dht_get``, except that reads of ``key`` during ``outage`` (virtual seconds) return nothing."""
    read = rt.dht_get

    async def lagging_read(k):
        value = await read(k)
        return None if k == key and outage[0] <= rt.now() < outage[1] else value

    return lagging_read


def _lost_stores(rt, key: str, outage: tuple[float, float]):
    """``rt.dht_store``, except that stores of ``key`` during ``outage`` never land."""
    store = rt.dht_store

    async def lossy_store(k, value, expires_in, per_peer=False):
        if k != key or not outage[0] <= rt.now() < outage[1]:
            await store(k, value, expires_in, per_peer=per_peer)

    return lossy_store


def _two_servers_with_a_lagging_dht(outage: tuple[float, float], lag: str) -> tuple[StageServer, StageServer]:
    """Two servers of a one-stage pipeline; during ``outage`` every read of the stage's records returns nothing
    (``lag="reads"``), or the first server's stores of its record are lost (``lag="stores"``), as on a live swarm
    whose DHT operations stall past the records' lifetime when a new peer joins (seen in the live test of
    tests/test_swarm_live.py on a loaded machine: operations took ~4 s, records live 3 progress periods of 1 s)."""
    sim = make_sim(latency_s=0.005)
    peers = [add(sim, "a"), add(sim, "b")]
    trainer_peer = add(sim, "trainer")
    cfg = AveragingConfig(8, progress_period_s=0.1, matchmaking_time_s=0.05, matchmaking_slack_s=0.02)
    servers = [
        StageServer(peer.runtime, "run", TensorStageCompute(build_stages(CFG, 1, seed=0)[0], OptimConfig(), DenseCodec()),
                    cfg, throughput=1.0, bandwidth_mbps=100)
        for peer in peers
    ]
    if lag == "reads":
        for peer in peers:
            peer.runtime.dht_get = _lagging_reads(peer.runtime, stage_key("run", 0), outage)
    else:
        peers[0].runtime.dht_store = _lost_stores(peers[0].runtime, stage_key("run", 0), outage)
    batches = iter(torch.randint(0, CFG.vocab_size, (200, 2, 9), generator=torch.Generator().manual_seed(0)))

    class Stream:
        def next_micro_batch(self):
            batch = next(batches)
            return batch[:, :-1], batch[:, 1:]

    trainer = Trainer(trainer_peer.runtime, "run", 1, Stream(),
                      TrainerConfig(micro_batches=200, micro_batches_per_step=1, schedule="async"), lambda record: None)
    for peer, server in zip(peers, servers):
        _run(sim, peer, server.start())
    sim.run(until=sim.env.now + 2 * cfg.progress_period_s)  # each server has read the other's record
    _run(sim, trainer_peer, trainer.run())
    assert trainer.stats.micro_batches_done == 200
    sim.run(until=sim.env.now + 1.0)  # the last round ends
    return servers[0], servers[1]


def test_a_read_that_misses_the_readers_own_record_is_stale_and_no_server_steps_alone():
    a, b = _two_servers_with_a_lagging_dht(outage=(0.3, 0.7), lag="reads")
    assert a.progress.stale_reads > 0 and b.progress.stale_reads > 0  # the outage hit both
    assert a.stats.solo_steps == b.stats.solo_steps == 0
    assert a.epoch == b.epoch > 0
    torch.testing.assert_close(a.compute.parameter_values(None), b.compute.parameter_values(None), atol=0, rtol=0)


def test_a_peer_missing_from_reads_for_less_than_a_record_lifetime_is_not_taken_for_gone():
    # the first server's record expires 0.3 s after its last store before the outage; its next store lands at the
    # first report after it: the second server misses it from its reads for less than a record's lifetime
    a, b = _two_servers_with_a_lagging_dht(outage=(0.3, 0.65), lag="stores")
    assert a.stats.solo_steps == b.stats.solo_steps == 0
    assert a.epoch == b.epoch > 0
    torch.testing.assert_close(a.compute.parameter_values(None), b.compute.parameter_values(None), atol=0, rtol=0)
