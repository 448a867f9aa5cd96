"""The swarm protocol in simulation: in-stage averaging, crashes, joiners, routing, rebalancing, determinism."""

import pytest
import torch

from node0sim.metrics import RunRecorder
from node0sim.model import build_stages
from node0sim.protocol.averaging import AveragingConfig, GroupAverager
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.trainer import Trainer, TrainerConfig
from node0sim.sim.gpus import gpu_profile
from node0sim.sim.runner import SimulatedRun
from tests.runs import comparable, run_config
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG

SMALL = (
    "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=32", "train.eval_batches=0",
    "train.schedule=async", "topology.num_trainers=2", "averaging.average_state_every=0",
    # the tiny model steps in milliseconds of virtual time: make matchmaking fast enough to keep up
    "averaging.matchmaking_time_s=0.3", "averaging.matchmaking_slack_s=0.05", "averaging.progress_period_s=0.1",
    "sim.dht_latency_ms=10", "network=datacenter", "sim.gpu=t4", "sim.utilization=0.0002",
)


def _run(tmp_path, *overrides):
    run = run_config(*SMALL, *overrides)
    return SimulatedRun(run, tmp_path, RunRecorder(tmp_path, run.train.steps, stream=None))


def _params(server):
    return torch.cat([p.detach().reshape(-1) for p in server.compute.parameters])


def _servers_of(sim_run, stage):
    members = [member for _, (_, member) in sorted(sim_run.swarm.members.items())]
    return [m.server for m in members if m.server and m.server.stage == stage]


def _trace(tmp_path, *rows):
    path = tmp_path / "trace.csv"
    path.write_text("time,peer,event\n" + "\n".join(rows) + "\n")
    return f"churn.trace_file={path}"


# ---- the all-reduce itself --------------------------------------------------------------------

def _averagers(names, timeout=10.0):
    sim = make_sim(latency_s=0.01)
    peers = {name: add(sim, name) for name in names}
    averagers = {}
    for name, peer in peers.items():
        averagers[name] = GroupAverager(peer.runtime, 0, AveragingConfig(8, averaging_timeout_s=timeout))
        averagers[name].serve()
    return sim, peers, averagers


def test_all_reduce_gives_every_member_the_sample_weighted_average():
    sim, peers, averagers = _averagers(["a", "b", "c"])
    sums = {"a": torch.arange(10.0) * 2, "b": torch.ones(10) * 30, "c": -torch.arange(10.0)}
    weights = {"a": 2.0, "b": 3.0, "c": 5.0}  # samples behind each peer's summed gradients
    members = ["a", "b", "c"]
    tasks = {
        n: peers[n].runtime.spawn(averagers[n].all_reduce("r", members, [10.0, 20.0, 30.0], sums[n], weights[n]))
        for n in members
    }
    sim.run(until=sim.env.all_of([t.process for t in tasks.values()]))
    expected = (sums["a"] + sums["b"] + sums["c"]) / 10.0
    for name in members:
        result, contributors = tasks[name].process.value
        assert contributors == 3
        torch.testing.assert_close(result, expected)
    assert sim.env.now < 1.0


@pytest.mark.parametrize("how", ["silent", "crashed"])
def test_a_member_vanishing_mid_all_reduce_costs_the_others_at_most_the_timeout(how):
    sim, peers, averagers = _averagers(["a", "b", "c"], timeout=7.0)
    if how == "crashed":
        peers["c"].crash()
    sums = {"a": torch.full((9,), 1.0), "b": torch.full((9,), 3.0)}
    tasks = {n: peers[n].runtime.spawn(averagers[n].all_reduce("r", ["a", "b", "c"], [1.0, 1.0, 1.0], sums[n], 1.0))
             for n in ("a", "b")}
    sim.run(until=sim.env.all_of([t.process for t in tasks.values()]))
    assert sim.env.now == pytest.approx(7.0, abs=0.1)
    a, _ = tasks["a"].process.value
    b, _ = tasks["b"].process.value
    # parts owned by a and b: the average of the survivors; c's part: each keeps its own values
    torch.testing.assert_close(a[:6], torch.full((6,), 2.0))
    torch.testing.assert_close(b[:6], torch.full((6,), 2.0))
    torch.testing.assert_close(a[6:], torch.full((3,), 1.0))
    torch.testing.assert_close(b[6:], torch.full((3,), 3.0))
    assert averagers["a"].timeouts >= 1


# ---- whole runs -------------------------------------------------------------------------------

def test_peers_of_a_stage_hold_identical_parameters_after_averaging(tmp_path):
    sim_run = _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=150")
    summary = sim_run.execute()
    assert summary["averaging_rounds"] > 0 and summary["solo_steps"] == 0
    for stage in range(2):
        first, second = _servers_of(sim_run, stage)
        assert first.stats.epochs == second.stats.epochs > 5
        torch.testing.assert_close(_params(first), _params(second), atol=1e-6, rtol=0)


def test_crash_mid_run_loses_no_micro_batch_silently(tmp_path):
    sim_run = _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=150",
                   "churn=trace", _trace(tmp_path, "1.0,s1p1,crash"), "train.request_timeout_s=1",
                   "averaging.averaging_timeout_s=1")
    summary = sim_run.execute()
    assert summary["churn_events"]["crash"] == 1
    assert summary["micro_batches_started"] == summary["micro_batches_done"] + summary["dropped_micro_batches"]
    assert summary["samples"] == 4 * summary["micro_batches_done"]
    assert summary["steps"] == 150 and summary["final_peers_per_stage"] == [2, 1]
    survivor = _servers_of(sim_run, 1)[0]
    assert survivor.stats.epochs > 5  # kept stepping (alone) after the crash


@pytest.mark.parametrize("event", ["crash", "kill"])
def test_a_killed_server_fails_its_callers_at_once_and_a_vanished_one_after_their_timeout(tmp_path, event):
    """``kill`` (process killed, host up: connections reset) against ``crash`` (the host vanished): the same
    protocol, the same accounting; only how the callers learn of it differs."""
    sim_run = _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=40",
                   "churn=trace", _trace(tmp_path, f"1.0,s1p1,{event}"), "train.request_timeout_s=5",
                   "averaging.averaging_timeout_s=1")
    summary = sim_run.execute()
    assert summary["churn_events"][event] == 1 and summary["steps"] == 40
    assert summary["micro_batches_started"] == summary["micro_batches_done"] + summary["dropped_micro_batches"]
    if event == "kill":
        assert summary["failed_requests"] > 0 and summary["timed_out_requests"] == 0
    else:
        assert summary["timed_out_requests"] > 0


def test_joiner_downloads_the_stage_state_and_averages_in_the_next_round(tmp_path):
    # epochs of 64 samples: long next to a state download, as in a real swarm
    sim_run = _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=1", "train.steps=200",
                   "averaging.target_batch_size=64", "churn=trace", _trace(tmp_path, "1.0,late,join"),
                   "topology.rebalance_period_s=0")
    summary = sim_run.execute()
    joiner = sim_run.swarm.members["late"][1].server
    assert joiner.stats.state_downloads >= 1 and joiner.stats.averaging_rounds >= 1
    (other,) = [s for s in _servers_of(sim_run, joiner.stage) if s is not joiner]
    assert joiner.epoch == other.epoch and joiner.compute.updates == other.compute.updates
    torch.testing.assert_close(_params(joiner), _params(other), atol=1e-6, rtol=0)
    assert summary["state_download_bytes"] > 0


def test_exported_state_loads_exactly_into_a_fresh_peer():
    first, second = (TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec()) for _ in "ab")
    hidden = torch.randn(2, 8, CFG.dim)
    for _ in range(3):
        first.tail(hidden, None, torch.randint(0, CFG.vocab_size, (2, 8)))
        first.apply_update(2)
    second.import_state(first.export_state())
    assert second.updates == first.updates == 3
    torch.testing.assert_close(second.parameter_values(None), first.parameter_values(None), atol=0, rtol=0)
    targets = torch.randint(0, CFG.vocab_size, (2, 8))
    for compute in (first, second):  # the optimizer state came along: the next step is identical too
        compute.tail(hidden, None, targets)
        compute.apply_update(2)
    torch.testing.assert_close(second.parameter_values(None), first.parameter_values(None), atol=1e-7, rtol=0)


def test_rebalancing_fills_an_emptied_stage_and_the_stall_is_visible(tmp_path):
    sim_run = _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=150",
                   "churn=trace", _trace(tmp_path, "0.5,s1p0,crash", "0.5,s1p1,leave"),
                   "topology.rebalance_period_s=1", "sim.snapshot_period_s=0.1", "train.request_timeout_s=1",
                   "train.max_retries=20")
    summary = sim_run.execute()
    assert summary["stage_moves"] == 1 and summary["final_peers_per_stage"] == [1, 1]
    assert summary["steps"] == 150
    snapshots = [r["peers_per_stage"] for r in sim_run.recorder.records if r.get("event") == "swarm"]
    assert [2, 0] in snapshots  # the empty stage shows in the metrics before a peer moves there


def test_balanced_swarm_never_moves(tmp_path):
    sim_run = _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=150",
                   "topology.rebalance_period_s=0.2", "topology.rebalance_margin=0.05")
    assert sim_run.execute()["stage_moves"] == 0


def test_same_seed_gives_the_same_summary_with_churn(tmp_path):
    churn = ("topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=100", "churn=poisson",
             "churn.join_rate_per_hour=7200", "churn.mean_session_s=3", "train.request_timeout_s=1",
             "train.max_retries=20")
    first = _run(tmp_path / "a", *churn).execute()
    second = _run(tmp_path / "b", *churn).execute()
    assert first["churn_events"]["join"] > 0 and first["churn_events"]["crash"] + first["churn_events"]["leave"] > 0
    assert comparable(first) == comparable(second)


# ---- routing ----------------------------------------------------------------------------------

def test_routing_prefers_faster_peers_and_stops_sending_to_a_crashed_one():
    sim = make_sim(latency_s=0.005)
    (stage,) = build_stages(CFG, 1, seed=0)
    servers = {}
    for name, gpu in (("fast", "a100"), ("slow", "t4")):
        # slow enough that compute, not latency, decides how fast a peer answers
        peer = sim.add_peer(name, region="r", up_mbps=1000, down_mbps=1000, gpu=gpu_profile(gpu), utilization=1e-6)
        compute = TensorStageCompute(build_stages(CFG, 1, seed=0)[0], OptimConfig(lr=3e-4, warmup_steps=0), DenseCodec())
        servers[name] = (peer, StageServer(peer.runtime, "run", compute, AveragingConfig(10**9, progress_period_s=5.0),
                                           throughput=peer.flops_per_s / 1e9, bandwidth_mbps=1000))
        peer.runtime.spawn(servers[name][1].start())
    trainer_peer = add(sim, "trainer", 1000, 1000)
    batch = torch.randint(0, CFG.vocab_size, (2, 17))

    class Repeat:
        def next_micro_batch(self):
            return batch[:, :-1], batch[:, 1:]

    trainer = Trainer(trainer_peer.runtime, "run", 1, Repeat(),
                      TrainerConfig(micro_batches=400, micro_batches_per_step=1, schedule="async", max_inflight=8,
                                    request_timeout_s=5.0), lambda record: None)
    task = trainer_peer.runtime.spawn(trainer.run())
    sim.run(until=sim.env.timeout(1.0))
    fast, slow = servers["fast"][1].stats.samples, servers["slow"][1].stats.samples
    share = fast / (fast + slow)
    expected = 312 / (312 + 65)  # A100 vs T4 peak FLOP/s
    assert abs(share - expected) < 0.1, (fast, slow)
    servers["fast"][0].crash()
    sim.run(until=task.process)
    assert trainer.stats.micro_batches_done + trainer.stats.micro_batches_dropped == 400
    assert trainer.stats.failed_requests <= 8 + 1  # the requests in flight when it crashed, then banned


# ---- PowerSGD -----------------------------------------------------------------------------------

def test_powersgd_recovers_the_exact_mean_of_low_rank_gradients_with_fewer_bytes():
    from node0sim.protocol.powersgd import PowerSGD, phase_lengths

    shapes = [(40, 30), (30,)]
    u = torch.randn(40, 1, generator=torch.Generator().manual_seed(0))
    sim, peers, averagers = _averagers(["a", "b"])
    grads, samples = {}, {"a": 2, "b": 6}
    for i, name in enumerate(("a", "b")):
        v = torch.randn(1, 30, generator=torch.Generator().manual_seed(i + 1))
        bias = torch.full((30,), float(i))
        grads[name] = torch.cat([(u @ v).reshape(-1), bias]) * samples[name]  # sums over samples
    states = {n: PowerSGD(shapes, rank=2) for n in ("a", "b")}
    tasks = {n: peers[n].runtime.spawn(states[n].average(averagers[n], "g", ["a", "b"], [1.0, 1.0], grads[n], samples[n], 7))
             for n in ("a", "b")}
    sim.run(until=sim.env.all_of([t.process for t in tasks.values()]))
    expected = (grads["a"] + grads["b"]) / 8
    for name in ("a", "b"):
        mean, contributors = tasks[name].process.value
        assert contributors == 2
        torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-4)
    first, second = phase_lengths(shapes, 2)
    assert first + second == 40 * 2 + 30 + 30 * 2 < 40 * 30 + 30


def test_node0_averaging_uses_powersgd_in_timing_mode(tmp_path):
    summary = SimulatedRun(
        run_config("model=node0_8b", "sim.numerics=false", "topology.num_stages=32", "topology.peers_per_stage=2",
                           "topology.num_trainers=4", "train.schedule=async", "train.steps=20", "train.batch_size=8",
                           "train.micro_batch_size=1", "train.seq_len=4096", "averaging=node0", "averaging.target_batch_size=4",
                           "averaging.matchmaking_time_s=1", "averaging.progress_period_s=0.5",
                           "compression=subspace", "compression.rate=100", "network=datacenter", "train.eval_batches=0"),
        tmp_path, RunRecorder(tmp_path, 20, stream=None),
    ).execute()
    assert summary["averaging_rounds"] > 0
    # rank-64 factors instead of fp32 gradients: far less than one full gradient copy per round
    full_copy = 2 * 218_112_000 * 4
    assert summary["averaging_bytes"] < full_copy * summary["averaging_rounds"] / 10
