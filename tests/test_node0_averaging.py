"""Node0's averaging-side mechanisms on the simulator (virtual time): warm-started PowerSGD and its Q handed
to joiners, the tail left uncompressed, partition state averaging with optimizer state, equal all-reduce parts,
the optimizer lock that blocks backward while a stage averages, and the watchdog."""

import copy

import pytest
import torch

from node0sim.assembly import server_report
from node0sim.model import build_stages
from node0sim.protocol.averaging import AveragingConfig, GroupAverager
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.messages import ForwardRequest
from node0sim.protocol.powersgd import PowerSGD, phase_lengths
from node0sim.protocol.stage_compute import CostStageCompute, OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.summary import ServerTotals
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG
from tests.test_swarm_protocol import _run


def _spectrum_matrix(m: int, n: int, singular_values: list[float], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=generator)).Q[:, : len(singular_values)]
    v = torch.linalg.qr(torch.randn(n, n, generator=generator)).Q[:, : len(singular_values)]
    return u @ torch.diag(torch.tensor(singular_values)) @ v.T


def _best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def _powersgd_rounds(states: dict, gradients_per_round: list[dict], samples: dict) -> list[dict]:
    """Run PowerSGD rounds among ``states`` (name -> PowerSGD) on a simulated stage; per round, name -> (mean, contributors)."""
    sim = make_sim(latency_s=0.01)
    peers = {name: add(sim, name) for name in states}
    averagers = {name: GroupAverager(peer.runtime, 0, AveragingConfig(8, averaging_timeout_s=10.0)) for name, peer in peers.items()}
    for averager in averagers.values():
        averager.serve()
    members = sorted(states)
    outcomes = []
    for round_, gradients in enumerate(gradients_per_round):
        tasks = {
            name: peers[name].runtime.spawn(state.average(
                averagers[name], f"g{round_}", members, [1.0] * len(members), gradients[name] * samples[name], samples[name], round_,
            ))
            for name, state in states.items()
        }
        sim.run(until=sim.env.all_of([t.process for t in tasks.values()]))
        outcomes.append({name: task.process.value for name, task in tasks.items()})
    return outcomes


# ---- PowerSGD -----------------------------------------------------------------------------------

def test_warm_started_q_converges_to_the_best_rank_r_mean_and_a_fresh_q_does_not():
    shape, rank = (40, 30), 3
    mean = _spectrum_matrix(*shape, [10.0, 8.0, 6.0, 1.0, 0.5], seed=0)
    best = _best_rank(mean, rank)
    spread = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    gradients = {"a": (mean + spread).reshape(-1), "b": (mean - spread).reshape(-1)}  # equal weights: the mean is `mean`

    def errors(warm_start: bool) -> list[float]:
        states = {n: PowerSGD([shape], rank, warm_start=warm_start, init_seed=5) for n in gradients}
        result = []
        for _ in range(8):
            for state in states.values():
                state.errors.clear()  # every round compresses the same mean (no error feedback)
            (outcome,) = _powersgd_rounds(states, [gradients], {"a": 2, "b": 2})
            result.append(float((outcome["a"][0].view(shape) - best).norm() / best.norm()))
        return result

    warm, fresh = errors(True), errors(False)
    # power iteration: the error shrinks by about sigma_4 / sigma_3 = 1/6 per round, from the first round's
    assert next(i for i, e in enumerate(warm) if e < 1e-4) <= 5
    assert min(fresh) > 1e-2  # one power step from a random Q every round: never better than the first


def test_a_joiner_that_received_q_continues_exactly_like_the_peer_it_replaced():
    shape, rank, names = (24, 16), 2, ("a", "b", "c")
    generator = torch.Generator().manual_seed(0)
    column_space = torch.linalg.qr(torch.randn(shape[0], rank, generator=generator)).Q
    # rounds whose gradients share one rank-2 column space: the local error stays ~0, so Q is all a peer carries
    low_rank = [{n: (column_space @ torch.randn(rank, shape[1], generator=generator)).reshape(-1) for n in names} for _ in range(3)]
    full_rank = {n: torch.randn(shape, generator=generator).reshape(-1) for n in names}
    samples = dict.fromkeys(names, 1)
    before = {n: PowerSGD([shape], rank, warm_start=True, init_seed=3) for n in names}
    _powersgd_rounds(before, low_rank, samples)
    assert float(before["c"].errors[0].abs().max()) < 1e-4

    def next_round(joiner_gets_q: bool | None) -> dict:
        """The full-rank round with c as it was (None), or replaced by a joiner with or without the donor a's Q."""
        states = copy.deepcopy(before)
        if joiner_gets_q is not None:
            states["c"] = PowerSGD([shape], rank, warm_start=True, init_seed=3)
            if joiner_gets_q:
                states["c"].import_queries(states["a"].export_queries())  # what a state download carries
        (outcome,) = _powersgd_rounds(states, [full_rank], samples)
        return {"mean": outcome["c"][0], "q": states["c"].queries[0]}

    stayed, joined, uninformed = next_round(None), next_round(True), next_round(False)
    torch.testing.assert_close(joined["mean"], stayed["mean"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(joined["q"], stayed["q"], atol=1e-4, rtol=1e-4)
    assert float((uninformed["mean"] - stayed["mean"]).abs().max()) > 1e-2  # without Q it would not


class _FailsPhase(GroupAverager):
    """Gives no mean in the all-reduces whose tag ends with ``failing`` (a round that fails half way)."""

    failing = "/q"

    async def all_reduce(self, tag, members, bandwidths, vector, weight):
        result = await super().all_reduce(tag, members, bandwidths, vector, weight)
        return (None, result[1]) if tag.endswith(self.failing) else result


@pytest.mark.parametrize("warm_start", [False, True])
def test_a_round_that_fails_half_way_leaves_the_error_feedback_and_q_as_they_were(warm_start):
    shape, rank = (24, 16), 2
    gradients = [{n: torch.randn(shape, generator=torch.Generator().manual_seed(r * 2 + i)).reshape(-1) for i, n in enumerate("ab")}
                 for r in range(2)]
    states = {n: PowerSGD([shape], rank, warm_start=warm_start, init_seed=3) for n in "ab"}
    _powersgd_rounds(states, gradients[:1], {"a": 1, "b": 1})
    errors, queries = copy.deepcopy(states["a"].errors), copy.deepcopy(states["a"].queries)
    sim = make_sim(latency_s=0.01)
    peers = {n: add(sim, n) for n in "ab"}
    averagers = {n: _FailsPhase(peers[n].runtime, 0, AveragingConfig(8)) for n in "ab"}
    for averager in averagers.values():
        averager.serve()
    tasks = [peers[n].runtime.spawn(states[n].average(averagers[n], "g", ["a", "b"], [1.0, 1.0], gradients[1][n], 1, 1)) for n in "ab"]
    sim.run(until=sim.env.all_of([t.process for t in tasks]))
    assert all(t.process.value[0] is None for t in tasks)
    torch.testing.assert_close(states["a"].errors, errors, atol=0, rtol=0)
    torch.testing.assert_close(states["a"].queries, queries, atol=0, rtol=0)
    assert bool(queries) == warm_start


def _server(rt, stage: int, num_stages: int, averaging: AveragingConfig, averager=GroupAverager, bandwidth_mbps=100.0) -> StageServer:
    compute = TensorStageCompute(build_stages(CFG, num_stages, seed=0)[stage], OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec())
    return StageServer(rt, "run", compute, averaging, throughput=1.0, bandwidth_mbps=bandwidth_mbps, averager=averager)


def test_powersgd_skip_tail_leaves_only_the_tail_uncompressed():
    sim = make_sim()
    rt = add(sim, "p").runtime
    cfg = AveragingConfig(8, powersgd_rank=2, powersgd_skip_tail=True)
    assert [_server(rt, s, 3, cfg).powersgd is None for s in range(3)] == [False, False, True]
    assert _server(rt, 2, 3, AveragingConfig(8, powersgd_rank=2)).powersgd is not None


def test_a_state_download_carries_the_donors_warm_started_q():
    sim = make_sim(latency_s=0.01)
    donor_rt, joiner_rt = add(sim, "donor").runtime, add(sim, "joiner").runtime
    cfg = AveragingConfig(8, powersgd_rank=2, powersgd_warm_start=True)
    donor, joiner = _server(donor_rt, 1, 2, cfg), _server(joiner_rt, 1, 2, cfg)
    donor_rt.serve("get_state", donor.handle_get_state)
    q_values = phase_lengths(donor.compute.parameter_shapes, 2)[1]
    donor.powersgd.import_queries(torch.linspace(-1.0, 1.0, q_values))  # as after some rounds: not the initial draw
    task = joiner_rt.spawn(joiner.state_transfer._download_from(["donor"]))
    sim.run(until=task.process)
    assert task.process.value and joiner.stats.state_downloads == 1
    torch.testing.assert_close(joiner.powersgd.export_queries(), donor.powersgd.export_queries(), atol=0, rtol=0)
    assert sim.traffic["get_state"] >= 4 * q_values + donor.compute.export_state().nbytes > 4 * q_values > 0


# ---- state averaging --------------------------------------------------------------------------

def test_partition_parts_cover_every_entry_exactly_once_in_both_modes():
    cfg = AveragingConfig(8, sparta_fraction=0.05)
    assert cfg.num_partitions == 20 and AveragingConfig(8, sparta_fraction=0.3).num_partitions == 4
    stage = build_stages(CFG, 2, seed=0)[1]
    compute = TensorStageCompute(stage, OptimConfig(), DenseCodec())
    cost = CostStageCompute(CFG, 1, 2, stage.layer_range, DenseCodec(), torch.float32)
    parts = [compute.partition_index(20, part, seed=7) for part in range(20)]
    counts = torch.bincount(torch.cat(parts), minlength=compute.num_trainable)
    assert counts.tolist() == [1] * compute.num_trainable
    assert [len(p) for p in parts] == [len(cost.partition_index(20, part, seed=7)) for part in range(20)]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    torch.testing.assert_close(compute.partition_index(20, 23, seed=7), parts[3], atol=0, rtol=0)  # cycled
    assert cost.state_values(parts[0]).numel() == 3 * len(parts[0])  # parameters, exp_avg, exp_avg_sq


def _stepped_pair(cfg: AveragingConfig):
    sim = make_sim(latency_s=0.01)
    servers = [_server(add(sim, name).runtime, 1, 2, cfg) for name in ("a", "b")]
    for i, server in enumerate(servers):
        server.averager.serve()
        generator = torch.Generator().manual_seed(i)
        server.compute.set_parameter_values(torch.randn(server.compute.num_trainable, generator=generator), None)
        server.compute.step_with(torch.randn(server.compute.num_trainable, generator=generator))
    return sim, servers


def _state_rounds(sim, servers, rounds: int, every: int) -> list[float]:
    """Run ``rounds`` state-averaging rounds at epochs every, 2 every, ...: after each, the fraction of entries equal on both."""
    members = sorted(s.rt.peer_id for s in servers)
    fractions = []
    for round_ in range(rounds):
        for server in servers:
            server.progress.epoch = (round_ + 1) * every
        tasks = [s.rt.spawn(s._average_parameters(members, [1.0, 1.0])) for s in servers]
        sim.run(until=sim.env.all_of([t.process for t in tasks]))
        a, b = (s.compute.parameter_values(None) for s in servers)
        fractions.append(float((a == b).float().mean()))
    return fractions


def test_partition_averaging_averages_every_entry_exactly_once_per_one_over_p_rounds_optimizer_state_too():
    cfg = AveragingConfig(8, sparta_fraction=0.25, average_state_every=5, state_averaging="partition")
    sim, servers = _stepped_pair(cfg)
    a, b = servers
    n = a.compute.num_trainable
    moments = [s.compute._state_tensor("exp_avg") for s in servers]
    assert not torch.equal(*moments)
    fractions = _state_rounds(sim, servers, 4, every=5)
    sizes = [len(a.compute.partition_index(4, part, 0)) for part in range(4)]
    assert fractions == pytest.approx([sum(sizes[:k + 1]) / n for k in range(4)], abs=1e-9)  # each round a new part
    assert fractions[-1] == 1.0 and a.stats.state_averaging_rounds == 4
    for key in ("exp_avg", "exp_avg_sq"):  # the optimizer state was averaged too: the mean of the two peers'
        torch.testing.assert_close(a.compute._state_tensor(key), b.compute._state_tensor(key), atol=0, rtol=0)
    torch.testing.assert_close(a.compute._state_tensor("exp_avg"), (moments[0] + moments[1]) / 2, atol=1e-7, rtol=1e-6)


def test_random_state_averaging_leaves_entries_never_averaged_after_one_over_p_rounds():
    sim, servers = _stepped_pair(AveragingConfig(8, sparta_fraction=0.25, average_state_every=5))
    fractions = _state_rounds(sim, servers, 4, every=5)
    assert fractions[-1] == pytest.approx(1 - 0.75**4, abs=0.03)  # independent draws: 68% covered, not 100%
    assert not torch.equal(*(s.compute._state_tensor("exp_avg") for s in servers))  # parameters only


# ---- all-reduce part sizes -----------------------------------------------------------------------

class _RecordsParts(GroupAverager):
    """Records the length of every averaged part it receives, by its owner."""

    def __init__(self, *args):
        super().__init__(*args)
        self.part_lengths = {}

    async def handle_gather_part(self, caller, msg):
        self.part_lengths[caller] = msg.values.numel()
        return await super().handle_gather_part(caller, msg)


@pytest.mark.parametrize("part_sizes, expected", [("bandwidth", [100, 200, 300]), ("equal", [200, 200, 200])])
def test_all_reduce_parts_follow_bandwidth_or_come_out_equal(part_sizes, expected):
    sim = make_sim(latency_s=0.01)
    names = ["a", "b", "c"]
    peers = {n: add(sim, n) for n in names}
    averagers = {n: _RecordsParts(peers[n].runtime, 0, AveragingConfig(8, part_sizes=part_sizes)) for n in names}
    for averager in averagers.values():
        averager.serve()
    vectors = {n: torch.full((600,), float(i)) for i, n in enumerate(names)}
    tasks = [peers[n].runtime.spawn(averagers[n].all_reduce("r", names, [10.0, 20.0, 30.0], vectors[n], 1.0)) for n in names]
    sim.run(until=sim.env.all_of([t.process for t in tasks]))
    for task in tasks:
        torch.testing.assert_close(task.process.value[0], torch.full((600,), 1.0))
    lengths = {owner: length for averager in averagers.values() for owner, length in averager.part_lengths.items()}
    assert [lengths[n] for n in names] == expected


def test_part_sizes_and_state_averaging_reject_unknown_values():
    with pytest.raises(ValueError, match="averaging.part_sizes"):
        AveragingConfig(8, part_sizes="fast")
    with pytest.raises(ValueError, match="averaging.state_averaging"):
        AveragingConfig(8, state_averaging="all")
    with pytest.raises(ValueError, match="averaging.watchdog_failed_rounds"):
        AveragingConfig(8, watchdog_failed_rounds=-1)


# ---- the optimizer lock ----------------------------------------------------------------------------

def _backwards_during_all_reduce(tmp_path, monkeypatch, blocks_serving: bool) -> tuple[int, int, int]:
    """(backwards that completed on a peer while that peer was in a gradient all-reduce, backwards, all-reduces)."""
    from node0sim.protocol.batching import BatchingQueue

    completed, rounds = [], []
    submit, all_reduce = BatchingQueue.submit, GroupAverager.all_reduce

    async def recording_submit(self, kind, item, cost, key=None):
        result = await submit(self, kind, item, cost, key)
        if kind in ("backward", "tail"):
            completed.append((self.rt.peer_id, self.rt.now()))
        return result

    async def recording_all_reduce(self, tag, members, bandwidths, vector, weight):
        started = self.rt.now()
        result = await all_reduce(self, tag, members, bandwidths, vector, weight)
        if tag.startswith("grad/") and len(members) > 1:
            rounds.append((self.rt.peer_id, started, self.rt.now()))
        return result

    monkeypatch.setattr(BatchingQueue, "submit", recording_submit)
    monkeypatch.setattr(GroupAverager, "all_reduce", recording_all_reduce)
    _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=60", "network=internet",
         f"averaging.blocks_serving={str(blocks_serving).lower()}").execute()
    inside = sum(1 for peer, t in completed for p, start, end in rounds if p == peer and start < t < end)
    return inside, len(completed), len(rounds)


@pytest.mark.slow
@pytest.mark.parametrize("blocks_serving", [False, True])
def test_with_blocks_serving_no_backward_completes_on_a_stage_during_its_all_reduce(tmp_path, monkeypatch, blocks_serving):
    inside, backwards, rounds = _backwards_during_all_reduce(tmp_path, monkeypatch, blocks_serving)
    assert backwards > 100 and rounds > 10
    assert (inside == 0) == blocks_serving  # without the lock, backwards do complete while the stage averages


# ---- the watchdog -------------------------------------------------------------------------------------

class _NeverAverages(GroupAverager):
    """An all-reduce that always times out as a whole: no mean."""

    async def all_reduce(self, tag, members, bandwidths, vector, weight):
        await self.rt.sleep(self.cfg.averaging_timeout_s)
        self.timeouts += 1
        return None, 1


def _failing_stage(limit: int, seconds: float) -> tuple[list[StageServer], object]:
    """Two timing-mode servers of one stage whose every all-reduce fails, fed 4 samples each per second for ``seconds``."""
    sim = make_sim(latency_s=0.01)
    cfg = AveragingConfig(8, averaging_timeout_s=2.0, watchdog_failed_rounds=limit)
    servers = []
    for name in ("a", "b"):
        rt = add(sim, name).runtime
        compute = CostStageCompute(CFG, 1, 2, range(2, 4), DenseCodec(), torch.float32)
        servers.append(StageServer(rt, "run", compute, cfg, throughput=1.0, bandwidth_mbps=50, averager=_NeverAverages))
        rt.spawn(servers[-1].start())

    async def feed(rt):
        while True:
            await rt.sleep(1.0)
            for server in servers:
                server.progress.count(4)

    servers[0].rt.spawn(feed(servers[0].rt))
    sim.run(until=seconds)
    return servers, sim


def test_the_watchdog_exits_after_the_configured_failed_rounds_and_the_counters_show_it():
    servers, sim = _failing_stage(limit=2, seconds=60.0)
    for server in servers:
        assert server.stats.watchdog_exit == "failed_rounds" and server.exited
        assert server.stats.epochs == 2 and server.stats.failed_rounds_in_a_row == 2
    totals = ServerTotals.of([server_report(s) for s in servers], 2, [0, 2], 0, 0)
    assert totals.watchdog_exits == {"failed_rounds": 2, "failed_state_loads": 0, "nan_gradients": 0}
    assert sim.dht.get("run/stage/1", sim.env.now) in (None, {})  # both withdrew their records
    with pytest.raises(ValueError, match="exited"):
        servers[0].check_request(ForwardRequest(1, torch.zeros(1, 2, 3)), ForwardRequest)  # and refuse requests


def test_without_a_watchdog_the_peers_keep_failing_rounds():
    servers, _ = _failing_stage(limit=0, seconds=60.0)
    for server in servers:
        assert server.stats.watchdog_exit is None and server.stats.epochs > 5
        # every gradient round failed, and every state round (each average_state_every = 5 epochs) too
        assert server.stats.failed_rounds_in_a_row == server.stats.epochs + server.stats.epochs // 5


def test_the_watchdog_exits_on_non_finite_gradients():
    sim = make_sim()
    rt = add(sim, "p").runtime
    server = _server(rt, 1, 2, AveragingConfig(8, watchdog_nan_gradients=True))
    rt.spawn(server.start())
    sim.run(until=1.0)
    server.compute.parameters[0].grad = torch.full_like(server.compute.parameters[0], float("nan"))
    server.progress.count(8)
    sim.run(until=3.0)
    assert server.stats.watchdog_exit == "nan_gradients" and server.stats.epochs == 0


def test_the_watchdog_exits_when_a_state_load_fails():
    sim = make_sim(latency_s=0.01)
    cfg = AveragingConfig(8, state_timeout_s=1.0, progress_period_s=2.0, watchdog_failed_state_loads=1)
    donor_peer, joiner_peer = add(sim, "donor"), add(sim, "joiner")
    donor, joiner = _server(donor_peer.runtime, 1, 2, cfg), _server(joiner_peer.runtime, 1, 2, cfg)
    donor_peer.runtime.spawn(donor.start())
    sim.run(until=1.0)
    donor_peer.crash()  # its record outlives it: the joiner asks it for the state and gets no answer
    joiner_peer.runtime.spawn(joiner.start(load_state=True))
    sim.run(until=20.0)
    assert joiner.stats.failed_state_downloads >= 1 and joiner.stats.state_downloads == 0
    assert joiner.stats.watchdog_exit == "failed_state_loads" and not joiner.ready


@pytest.mark.slow
def test_watchdog_exits_count_as_churn_in_the_run_summary(tmp_path):
    # an averaging timeout shorter than one all-reduce over 80 Mb/s: every round times out, every server exits after two
    sim_run = _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=100", "network=internet",
                   "averaging.averaging_timeout_s=0.08", "averaging.watchdog_failed_rounds=2", "train.max_sim_time_s=20",
                   "train.request_timeout_s=1")
    summary = sim_run.execute()
    assert summary["churn_events"]["watchdog_exit"] == 4 == summary["watchdog_exits"]["failed_rounds"]
    assert summary["final_peers_per_stage"] == [0, 0] and summary["steps"] < 100


# ---- auto-step ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("auto_step_s, expected_gap", [(0.0, 10.0), (3.0, 3.0)])
def test_an_idle_peer_checks_whether_its_epoch_is_due_every_auto_step_s(auto_step_s, expected_gap):
    sim = make_sim()
    rt = add(sim, "p").runtime
    server = _server(rt, 1, 2, AveragingConfig(8, progress_period_s=10.0, auto_step_s=auto_step_s))
    checks, refresh = [], server.progress.refresh

    async def counting_refresh():
        checks.append(rt.now())
        await refresh()

    server.progress.refresh = counting_refresh
    rt.spawn(server.start())
    sim.run(until=60.0)
    gaps = [later - earlier for earlier, later in zip(checks[1:], checks[2:])]  # after start's own refresh
    assert gaps and all(gap == pytest.approx(expected_gap) for gap in gaps)


# ---- joining ---------------------------------------------------------------------------------------------

def _donor_and_joiner(cfg: AveragingConfig, donor_samples: int):
    sim = make_sim(latency_s=0.01)
    donor, joiner = (_server(add(sim, name).runtime, 1, 2, cfg) for name in ("donor", "joiner"))
    donor.rt.spawn(donor.start())
    sim.run(until=0.5)
    donor.progress.count(donor_samples)
    return sim, donor, joiner


@pytest.mark.parametrize("waits", [False, True])
def test_a_joiner_waits_for_the_start_of_a_round_before_it_loads_the_state(waits):
    cfg = AveragingConfig(100, progress_period_s=1.0, join_waits_for_round=waits)
    sim, donor, joiner = _donor_and_joiner(cfg, donor_samples=50)  # the stage's round is half done
    sim.run(until=2.0)
    joiner.rt.spawn(joiner.start(load_state=True))
    sim.run(until=6.0)
    assert joiner.stats.state_downloads == (0 if waits else 1)
    donor.progress.samples, donor.progress.epoch = 0, 1  # the donor's round ended: a new one starts
    sim.run(until=12.0)
    assert joiner.stats.state_downloads >= 1 and joiner.ready


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_a_donor_serves_one_state_download_at_a_time(one_at_a_time):
    sim = make_sim(latency_s=0.01)
    cfg = AveragingConfig(8, one_download_per_donor=one_at_a_time)
    donor = _server(add(sim, "donor", up_mbps=1.0).runtime, 1, 2, cfg, bandwidth_mbps=1.0)  # a slow upload: a download lasts seconds
    donor.rt.serve("get_state", donor.handle_get_state)
    joiners = [_server(add(sim, f"j{i}").runtime, 1, 2, cfg) for i in range(2)]
    tasks = [j.rt.spawn(j.state_transfer._download_from(["donor"])) for j in joiners]
    sim.run(until=sim.env.all_of([t.process for t in tasks]))
    assert [t.process.value for t in tasks] == ([True, False] if one_at_a_time else [True, True])
    # a decline is not a failure (Node0's empty stream): the watchdog's failed_state_loads limit of 1 does not count it
    assert sum(j.stats.declined_state_downloads for j in joiners) == int(one_at_a_time)
    assert sum(j.stats.failed_state_downloads for j in joiners) == 0


def test_two_joiners_of_one_busy_donor_both_join_and_the_watchdog_counts_no_failed_load():
    sim = make_sim(latency_s=0.01)
    cfg = AveragingConfig(8, one_download_per_donor=True, watchdog_failed_state_loads=1)  # Node0's limit
    donor = _server(add(sim, "donor", up_mbps=1.0).runtime, 1, 2, cfg, bandwidth_mbps=1.0)  # an upload lasts seconds
    donor.rt.spawn(donor.start())
    sim.run(until=0.5)
    joiners = [_server(add(sim, f"j{i}").runtime, 1, 2, cfg) for i in range(2)]
    for joiner in joiners:
        joiner.rt.spawn(joiner.start(load_state=True))
    sim.run(until=30.0)
    assert all(j.ready and not j.exited for j in joiners), [j.stats.watchdog_exit for j in joiners]
    assert sum(j.stats.declined_state_downloads for j in joiners) >= 1
    assert sum(j.stats.failed_state_downloads for j in joiners) == 0 and sum(j.stats.state_downloads for j in joiners) >= 1


# ---- central stage assignment --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("assignment", ["decentralized", "central"])
def test_central_assignment_names_the_stage_the_decentralized_rule_picks(tmp_path, assignment):
    sim_run = _run(tmp_path, "topology.num_stages=2", "topology.peers_per_stage=2", "train.steps=40",
                   f"topology.stage_assignment={assignment}", "topology.rebalance_period_s=0", "churn=trace",
                   "churn.trace_file=" + str(_trace_file(tmp_path, "0.5,s1p1,leave", "1.0,late,join")))
    sim_run.execute()
    assert sim_run.swarm.members["late"][1].stage == 1  # the stage left with one peer (not the lowest index of a tie)
    assert (sim_run.swarm.organizer.assigned if sim_run.swarm.organizer else 0) == (assignment == "central")


def _trace_file(tmp_path, *rows):
    path = tmp_path / "trace.csv"
    path.write_text("time,peer,event\n" + "\n".join(rows) + "\n")
    return path
