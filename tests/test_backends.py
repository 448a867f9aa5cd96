"""The same protocol scenarios on both backends: the SimPy emulator and live hivemind peers on 127.0.0.1."""

import pytest
import torch

from node0sim.model import Llama, build_stages
from node0sim.protocol.averaging import Ack, AveragingConfig, GroupAverager
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.direct import DirectConfig
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.trainer import Trainer, TrainerConfig
from node0sim.runtime import RemoteError, RequestTimeout, RPCError
from tests.backends import BACKENDS, run_scenario
from tests.test_pipeline import CFG, FixedBatch

pytestmark = pytest.mark.slow


def _pipeline(num_stages: int, batch: torch.Tensor, micro: int, tail_calls: str = "fused", pipeline: str = "relayed",
              direct_schedule: str = "1f1b"):
    computes = [TensorStageCompute(s, OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec()) for s in build_stages(CFG, num_stages, seed=3)]

    async def scenario(runtimes):
        for i, compute in enumerate(computes):
            # a target batch the run never reaches: gradients stay accumulated for the check
            averaging = AveragingConfig(10**6, progress_period_s=5.0)
            direct = DirectConfig(num_stages) if pipeline == "direct" else None
            server = StageServer(runtimes[f"s{i}"], "run", compute, averaging, throughput=1.0, bandwidth_mbps=50, direct=direct)
            runtimes[f"s{i}"].spawn(server.start())
        micro_batches = batch.shape[0] // micro
        trainer = Trainer(
            runtimes["trainer"], "run", num_stages, FixedBatch(batch, micro),
            TrainerConfig(micro_batches=micro_batches, micro_batches_per_step=micro_batches, schedule="async", tail_calls=tail_calls,
                          pipeline=pipeline, direct_schedule=direct_schedule),
            lambda record: None,
        )
        return await trainer.run()

    return computes, scenario


@pytest.mark.parametrize("tail_calls,pipeline,direct_schedule", [
    ("fused", "relayed", "1f1b"), ("separate", "relayed", "1f1b"), ("fused", "direct", "1f1b"), ("fused", "direct", "gpipe"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pipeline_step_equals_the_single_process_model_on_both_backends(backend, tail_calls, pipeline, direct_schedule):
    batch = torch.randint(0, CFG.vocab_size, (6, 17), generator=torch.Generator().manual_seed(0))
    computes, scenario = _pipeline(3, batch, micro=2, tail_calls=tail_calls, pipeline=pipeline, direct_schedule=direct_schedule)
    stats = run_scenario(backend, ["trainer", "s0", "s1", "s2"], scenario)

    reference = Llama(CFG, seed=3)
    logits = reference(batch[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), batch[:, 1:].reshape(-1)).backward()
    assert stats.micro_batches_done == 3 and stats.failed_requests == 0
    expected = dict(reference.named_parameters())
    for compute in computes:
        for name, param in compute.module.named_parameters():
            torch.testing.assert_close(param.grad / 6, expected[name].grad, atol=1e-6, rtol=1e-4)


class _SkipsTheOwnVectorRule(GroupAverager):
    """A faulty member: sends its non-finite vector instead of taking part with zeros."""

    all_reduce = GroupAverager._all_reduce


def _averager_for(backend, faulty=False):
    if backend == "swarm/hivemind":
        from swarm.allreduce import HivemindGroupAverager, _CountingRunner

        class _FaultyHivemindAverager(HivemindGroupAverager):  # also runs hivemind's runner unchecked
            _runner_type = _CountingRunner
            all_reduce = HivemindGroupAverager._all_reduce

        return _FaultyHivemindAverager if faulty else HivemindGroupAverager
    return _SkipsTheOwnVectorRule if faulty else GroupAverager


async def _install_routers(backend, runtimes):
    if backend == "swarm/hivemind":
        from swarm.allreduce import install

        for rt in runtimes.values():
            await install(rt)


def _all_reduce(backend, vectors, weights, timeout=20.0, faulty=(), bandwidths=(10.0, 20.0, 30.0)):
    """``({member: ((mean, contributors), timeouts)}, elapsed)`` of the members that call all_reduce: those in
    ``vectors`` (the others of a, b, c are in the group but silent); ``faulty`` members skip the own-vector rule."""
    names = ["a", "b", "c"]

    async def scenario(runtimes):
        await _install_routers(backend, runtimes)
        cfg = AveragingConfig(8, averaging_timeout_s=timeout)
        averagers = {n: _averager_for(backend, n in faulty)(runtimes[n], 0, cfg) for n in names}
        for averager in averagers.values():
            averager.serve()
        members = sorted(runtimes[n].peer_id for n in names)
        started = runtimes["a"].now()
        rounds = {n: averagers[n].all_reduce("r", members, list(bandwidths), vectors[n], weights[n]) for n in vectors}
        tasks = [runtimes[n].spawn(rounds[n]) for n in vectors]
        results = await runtimes["a"].gather(tasks)
        return {n: (result, averagers[n].timeouts) for n, result in zip(vectors, results)}, runtimes["a"].now() - started

    return run_scenario(backend.split("/")[0], names, scenario)


AVERAGER_BACKENDS = [*BACKENDS, "swarm/hivemind"]


@pytest.mark.parametrize("backend", AVERAGER_BACKENDS)
def test_all_reduce_gives_every_member_the_sample_weighted_average_on_both_backends(backend):
    sums = {"a": torch.arange(1000.0) * 2, "b": torch.ones(1000) * 30, "c": -torch.arange(1000.0)}
    weights = {"a": 2.0, "b": 3.0, "c": 5.0}
    expected = (sums["a"] + sums["b"] + sums["c"]) / 10.0
    outcome, _ = _all_reduce(backend, sums, weights)
    for (result, contributors), _ in outcome.values():
        assert contributors == 3
        torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("backend", AVERAGER_BACKENDS)
def test_a_member_that_never_shows_up_costs_the_others_at_most_the_averaging_timeout(backend):
    timeout = 4.0
    vectors = {"a": torch.full((6000,), 2.0), "b": torch.full((6000,), 4.0)}  # "c" is in the group but silent
    outcome, elapsed = _all_reduce(backend, vectors, {"a": 1.0, "b": 1.0}, timeout, bandwidths=(1.0, 1.0, 1.0))
    assert elapsed <= timeout * 1.6
    for (result, contributors), timeouts in outcome.values():
        assert timeouts >= 1 and contributors == 2
        # the parts a and b own are averaged (3.0); the silent member's part keeps each peer's own values
        assert (result == 3.0).sum() >= 2000


# ---- the Averager's rule for bad parts (node0sim.protocol.averaging.Averager), on every averager --------

@pytest.mark.parametrize("backend", AVERAGER_BACKENDS)
def test_a_member_whose_vector_is_not_finite_adds_nothing_and_gets_the_others_mean(backend):
    sums = {"a": torch.arange(1000.0) * 2, "b": torch.ones(1000) * 30, "c": torch.full((1000,), float("nan"))}
    weights = {"a": 2.0, "b": 3.0, "c": 5.0}
    expected = (sums["a"] + sums["b"]) / 5.0
    outcome, _ = _all_reduce(backend, sums, weights)
    for (result, contributors), _ in outcome.values():
        assert contributors == 3  # c took part, with weight 0
        torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("backend", AVERAGER_BACKENDS)
def test_a_faulty_members_non_finite_parts_are_refused_and_nobody_gets_a_non_finite_mean(backend):
    vectors = {"a": torch.full((6000,), 2.0), "b": torch.full((6000,), 4.0), "c": torch.full((6000,), float("nan"))}
    weights = {"a": 1.0, "b": 1.0, "c": 1.0}
    outcome, _ = _all_reduce(backend, vectors, weights, timeout=4.0, faulty=("c",), bandwidths=(1.0, 1.0, 1.0))
    for name in "ab":
        (mean, contributors), timeouts = outcome[name]
        if backend == "swarm/hivemind":
            # c's contribution to a's and b's parts was refused; c's own part came back non-finite: no mean
            assert mean is None and contributors == 2 and timeouts >= 1
        else:  # the protocol's butterfly also refuses c's averaged part, keeps its own values there, and waits for none
            assert contributors == 2 and timeouts == 0
            assert int((mean == 3.0).sum()) == 4000 and int((mean == vectors[name]).sum()) == 2000


@pytest.mark.parametrize("backend", AVERAGER_BACKENDS)
def test_a_peer_whose_own_vector_is_not_finite_never_steps_alone_with_it(backend):
    vector = torch.full((6000,), 2.0)
    vector[7] = float("inf")
    outcome, _ = _all_reduce(backend, {"a": vector}, {"a": 3.0}, timeout=4.0, bandwidths=(1.0, 1.0, 1.0))
    (mean, _), _ = outcome["a"]
    assert mean is None  # a took part with weight 0 and b and c are silent: no weight behind the mean of a's part


@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_from_outside_the_group_are_refused_and_junk_rounds_are_not_kept_on_both_backends(backend):
    from node0sim.protocol.averaging import MAX_EARLY_ROUNDS, GatherPart, ReducePart
    from node0sim.protocol.messages import GATHER_PART, REDUCE_PART

    async def scenario(runtimes):
        cfg = AveragingConfig(8, averaging_timeout_s=4.0)
        averagers = {n: GroupAverager(runtimes[n], 0, cfg) for n in ("a", "b")}
        for averager in averagers.values():
            averager.serve()
        intruder = runtimes["x"]
        poison = torch.full((500,), 1e6)
        # before the round starts: parts for it (kept until the group is known, then dropped: x is no member) ...
        await intruder.call(runtimes["a"].peer_id, REDUCE_PART, ReducePart(0, "grad/1", poison, 1e6), 10)
        await intruder.call(runtimes["a"].peer_id, GATHER_PART, GatherPart(0, "grad/1", 1, poison), 10)
        # ... and junk rounds: a few are kept (a member may be a round ahead), the rest refused by name
        refusals = []
        for k in range(MAX_EARLY_ROUNDS + 3):
            try:
                await intruder.call(runtimes["a"].peer_id, REDUCE_PART, ReducePart(0, f"junk/{k}", poison[:10], 1.0), 10)
            except RPCError as error:
                refusals.append(str(error))
        members = sorted(runtimes[n].peer_id for n in ("a", "b"))
        vectors = {"a": torch.full((1000,), 2.0), "b": torch.full((1000,), 4.0)}
        results = await runtimes["a"].gather([
            runtimes[n].spawn(averagers[n].all_reduce("grad/1", members, [1.0, 1.0], vectors[n], 1.0)) for n in ("a", "b")
        ])
        # a round later than the averaging timeout drops the junk; during it (b never joins this one), the intruder's
        # part is refused by name
        await intruder.sleep(cfg.averaging_timeout_s)
        lone = runtimes["a"].spawn(averagers["a"].all_reduce("grad/2", members, [1.0, 1.0], vectors["a"], 1.0))
        await intruder.sleep(0.5)
        try:
            await intruder.call(runtimes["a"].peer_id, REDUCE_PART, ReducePart(0, "grad/2", poison, 1.0), 10)
            late = None
        except RPCError as error:
            late = str(error)
        await runtimes["a"].gather([lone])
        return results, refusals, late, len(averagers["a"]._rounds)

    results, refusals, late, rounds_kept = run_scenario(backend, ["a", "b", "x"], scenario)
    for mean, contributors in results:
        assert contributors == 2
        torch.testing.assert_close(mean, torch.full((1000,), 3.0))
    # grad/1 and junk/0-2 are held; the other 4 are refused
    assert len(refusals) == 4 and all("rounds this peer has not started hold parts already" in r for r in refusals)
    assert late is not None and "not a member of round 'grad/2'" in late
    assert rounds_kept == 0


# ---- the runtime interface's rules (node0sim/runtime.py), on both backends ----------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_withdrawn_dht_record_is_absent_and_a_later_store_replaces_an_earlier_one(backend):
    async def scenario(runtimes):
        a, b = runtimes["a"], runtimes["b"]
        await a.dht_store("test/k", {"x": 1}, expires_in=60, per_peer=True)
        await b.dht_store("test/k", {"x": 2}, expires_in=60, per_peer=True)
        await a.dht_store("test/k", {"x": 3}, expires_in=30, per_peer=True)  # expires sooner, replaces all the same
        replaced = await b.dht_get("test/k")
        await a.dht_store("test/k", None, expires_in=0, per_peer=True)
        withdrawn = await b.dht_get("test/k")
        await b.dht_store("test/k", None, expires_in=0, per_peer=True)
        await a.dht_store("test/plain", "v", expires_in=60)
        await a.dht_store("test/plain", None, expires_in=0)
        return a.peer_id, b.peer_id, replaced, withdrawn, await a.dht_get("test/k"), await b.dht_get("test/plain")

    a, b, replaced, withdrawn, emptied, plain = run_scenario(backend, ["a", "b"], scenario)
    assert replaced == {a: {"x": 3}, b: {"x": 2}}  # each entry under the id of the peer that stored it
    assert withdrawn == {b: {"x": 2}}
    assert emptied is None and plain is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_a_caller_gets_when_the_handler_refuses_fails_upstream_is_missing_or_too_slow(backend):
    async def scenario(runtimes):
        client, server = runtimes["client"], runtimes["server"]

        async def refuses(caller, request):
            raise ValueError("no thanks")

        async def fails_upstream(caller, request):
            raise RequestTimeout("upstream gave no answer")

        async def slow(caller, request):
            await server.sleep(3.0)
            return Ack()

        for method, handler in [("refuses", refuses), ("fails_upstream", fails_upstream), ("slow", slow)]:
            server.serve(method, handler)
        outcomes = {}
        for method, timeout in [("refuses", 10), ("fails_upstream", 10), ("missing", 10), ("slow", 1)]:
            started = client.now()
            try:
                await client.call(server.peer_id, method, Ack(), timeout=timeout)
            except RPCError as error:
                outcomes[method] = (type(error), str(error), client.now() - started)
        return outcomes

    outcomes = run_scenario(backend, ["client", "server"], scenario)
    assert outcomes["refuses"][0] is RemoteError and "no thanks" in outcomes["refuses"][1]
    assert outcomes["fails_upstream"][0] is RemoteError and "upstream gave no answer" in outcomes["fails_upstream"][1]
    assert outcomes["missing"][0] is RemoteError and "does not serve" in outcomes["missing"][1]
    assert outcomes["slow"][0] is RequestTimeout and outcomes["slow"][2] < 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_handler_bug_reaches_the_caller_as_a_remote_error_and_is_reported(backend):
    seen = []

    async def scenario(runtimes):
        async def buggy(caller, request):
            raise LookupError("handler bug")

        runtimes["server"].serve("buggy", buggy)
        try:
            await runtimes["client"].call(runtimes["server"].peer_id, "buggy", Ack(), timeout=10)
        except RemoteError as error:
            seen.append(str(error))
        await runtimes["client"].sleep(1.0)

    with pytest.raises(Exception, match="handler bug"):  # the simulation stops with it; a live peer keeps it in errors
        run_scenario(backend, ["client", "server"], scenario)
    assert len(seen) == 1 and "internal error in buggy: LookupError" in seen[0]


# ---- Node0's averaging mechanisms (tests/test_node0_averaging.py has them in detail, on virtual time) -------------

@pytest.mark.parametrize("part_sizes", ["bandwidth", "equal"])
def test_hiveminds_runner_deals_parts_by_bandwidth_or_equally(part_sizes):
    from swarm.allreduce import HivemindGroupAverager

    names = ["a", "b", "c"]

    async def scenario(runtimes):
        await _install_routers("swarm/hivemind", runtimes)
        cfg = AveragingConfig(8, averaging_timeout_s=20.0, part_sizes=part_sizes)
        averagers = {n: HivemindGroupAverager(runtimes[n], 0, cfg) for n in names}
        ordered = sorted(names, key=lambda n: runtimes[n].peer_id)  # the members' order: bandwidths 10, 20, 30
        members = [runtimes[n].peer_id for n in ordered]
        tasks = [runtimes[n].spawn(averagers[n].all_reduce("r", members, [10.0, 20.0, 30.0], torch.full((6000,), float(i)), 1.0))
                 for i, n in enumerate(names)]
        results = await runtimes["a"].gather(tasks)
        return results, [runtimes[n].sent_bytes.get("gather_part", 0) for n in ordered]

    results, gathered = run_scenario("swarm", names, scenario)
    for mean, contributors in results:
        assert contributors == 3
        torch.testing.assert_close(mean, torch.full((6000,), 1.0))
    # each member sends the part it averaged to the two others: bytes in proportion to its part (bandwidth 10:20:30)
    shares = [g / sum(gathered) for g in gathered]
    expected = [1 / 3] * 3 if part_sizes == "equal" else [1 / 6, 2 / 6, 3 / 6]
    assert shares == pytest.approx(expected, abs=0.05)


class _NeverAverages(GroupAverager):
    """An all-reduce that always fails as a whole (no mean)."""

    async def all_reduce(self, tag, members, bandwidths, vector, weight):
        await self.rt.sleep(0.2)
        self.timeouts += 1
        return None, 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_watchdog_exits_both_peers_of_a_stage_after_two_failed_rounds_on_both_backends(backend):
    from node0sim.protocol.stage_compute import CostStageCompute

    async def scenario(runtimes):
        cfg = AveragingConfig(8, progress_period_s=0.5, matchmaking_time_s=0.5, watchdog_failed_rounds=2)
        servers = [
            StageServer(runtimes[n], "run", CostStageCompute(CFG, 1, 2, range(2, 4), DenseCodec(), torch.float32), cfg,
                        throughput=1.0, bandwidth_mbps=50, averager=_NeverAverages)
            for n in ("a", "b")
        ]
        for server in servers:
            server.rt.spawn(server.start())
        rt = runtimes["observer"]
        for _ in range(60):
            await rt.sleep(0.5)
            if all(s.exited for s in servers):
                break
            for server in servers:
                server.progress.count(4)
        await rt.sleep(1.0)
        return [(s.stats.watchdog_exit, s.stats.epochs) for s in servers], await rt.dht_get("run/stage/1")

    outcomes, records = run_scenario(backend, ["observer", "a", "b"], scenario)
    assert outcomes == [("failed_rounds", 2)] * 2
    assert not records  # both withdrew from the stage


@pytest.mark.parametrize("backend", BACKENDS)
def test_partition_state_averaging_covers_every_entry_and_the_optimizer_state_on_both_backends(backend):
    stages = [build_stages(CFG, 2, seed=0)[1] for _ in range(2)]

    async def scenario(runtimes):
        cfg = AveragingConfig(8, sparta_fraction=0.25, average_state_every=1, state_averaging="partition")
        servers = []
        for i, (name, stage) in enumerate(zip(("a", "b"), stages)):
            compute = TensorStageCompute(stage, OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec())
            generator = torch.Generator().manual_seed(i)
            compute.set_parameter_values(torch.randn(compute.num_trainable, generator=generator), None)
            compute.step_with(torch.randn(compute.num_trainable, generator=generator))
            servers.append(StageServer(runtimes[name], "run", compute, cfg, throughput=1.0, bandwidth_mbps=50))
            servers[-1].averager.serve()
        members = sorted(s.rt.peer_id for s in servers)
        for epoch in range(1, 5):
            for server in servers:
                server.progress.epoch = epoch
            await runtimes["a"].gather([s.rt.spawn(s._average_parameters(members, [1.0, 1.0])) for s in servers])
        return [(s.compute.parameter_values(None), s.compute._state_tensor("exp_avg"), s.stats.state_averaging_rounds) for s in servers]

    (params_a, moments_a, rounds_a), (params_b, moments_b, rounds_b) = run_scenario(backend, ["a", "b"], scenario)
    assert rounds_a == rounds_b == 4
    torch.testing.assert_close(params_a, params_b, atol=0, rtol=0)
    torch.testing.assert_close(moments_a, moments_b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_organizer_names_the_stage_the_joiner_would_pick_itself_on_both_backends(backend):
    from node0sim.protocol.progress import StageRecord, stage_key
    from node0sim.protocol.swarm_peer import BalanceConfig, StageOrganizer, SwarmPeer

    async def scenario(runtimes):
        organizer = StageOrganizer(runtimes["organizer"], "run", 3, pending_s=60.0)
        organizer.serve()
        for stage, throughput in enumerate((10.0, 3.0, 5.0)):  # stage 1 is the weakest: 3 < 5 < 10
            record = StageRecord(0, 0, 0.0, 0.0, throughput, 50.0, True, None)
            await runtimes[f"p{stage}"].dht_store(stage_key("run", stage), record.to_dht(), expires_in=60, per_peer=True)
        joiner = runtimes["joiner"]

        def peer(organizer_id):
            return SwarmPeer(joiner, "run", 3, 2.0, None, BalanceConfig(0.0), organizer_id)

        return (await peer(runtimes["organizer"].peer_id)._assigned_stage(), await peer(None)._assigned_stage(),
                organizer.assigned)

    central, decentralized, assigned = run_scenario(backend, ["organizer", "joiner", "p0", "p1", "p2"], scenario)
    assert central == decentralized == 1 and assigned == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_organizer_spreads_joiners_that_arrive_together_where_their_own_picks_collide_on_both_backends(backend):
    from node0sim.protocol.progress import StageRecord, stage_key
    from node0sim.protocol.swarm_peer import BalanceConfig, StageOrganizer, SwarmPeer

    pending_s = 5.0

    async def scenario(runtimes):
        organizer = StageOrganizer(runtimes["organizer"], "run", 2, pending_s=pending_s)
        organizer.serve()
        record = StageRecord(0, 0, 0.0, 0.0, 2.0, 50.0, True, None)
        await runtimes["p0"].dht_store(stage_key("run", 0), record.to_dht(), expires_in=60, per_peer=True)

        def peer(name, organizer_id):
            return SwarmPeer(runtimes[name], "run", 2, 2.0, None, BalanceConfig(0.0), organizer_id)

        # none of the joiners announces: the organizer remembers whom it sent where, a joiner's own pick cannot
        own = [await peer(name, None)._assigned_stage() for name in ("j1", "j2", "j3")]
        central = [await peer(name, runtimes["organizer"].peer_id)._assigned_stage() for name in ("j1", "j2", "j3")]
        await runtimes["organizer"].sleep(pending_s)  # the three never announced: forgotten
        after_expiry = await peer("j4", runtimes["organizer"].peer_id)._assigned_stage()
        return own, central, after_expiry

    own, central, after_expiry = run_scenario(backend, ["organizer", "j1", "j2", "j3", "j4", "p0"], scenario)
    assert own == [1, 1, 1]  # stage 1 is empty, so every lone pick goes there
    assert central == [1, 0, 1]  # 2 in stage 1 after j1 ties stage 0's 2 (the lowest index wins), then stage 1 again
    assert after_expiry == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_joiner_receives_the_warm_started_q_with_the_state_on_both_backends(backend):
    from node0sim.protocol.powersgd import phase_lengths

    def server(rt):
        compute = TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec())
        cfg = AveragingConfig(8, powersgd_rank=2, powersgd_warm_start=True)
        return StageServer(rt, "run", compute, cfg, throughput=1.0, bandwidth_mbps=50)

    async def scenario(runtimes):
        donor, joiner = server(runtimes["donor"]), server(runtimes["joiner"])
        runtimes["donor"].serve("get_state", donor.handle_get_state)
        donor.powersgd.import_queries(torch.linspace(-1.0, 1.0, phase_lengths(donor.compute.parameter_shapes, 2)[1]))
        loaded = await joiner.state_transfer._download_from([runtimes["donor"].peer_id])
        return loaded, donor.powersgd.export_queries(), joiner.powersgd.export_queries()

    loaded, sent, received = run_scenario(backend, ["donor", "joiner"], scenario)
    assert loaded
    torch.testing.assert_close(received, sent, atol=0, rtol=0)


FREEZE_AFTER, FREEZE_S, MICRO_BATCHES = 30, 10.0, 60


class _Freeze:
    """One tail replica's freeze: armed once ``FREEZE_AFTER`` micro-batches are done, it falls on the first replica that
    gets a call after that, which then answers nothing for ``FREEZE_S`` (every call to it meanwhile waits, as in a
    SIGSTOPped process) and then runs each of those calls through. Falling on a call makes sure one is held whichever
    replica the router prefers: a replica frozen at the moment of arming got no call during its freeze in 3 of 10 live
    runs beside a busy loop (and in a fresh-clone CI run: no hedge won)."""

    def __init__(self):
        self.armed = False
        self.replica: StageServer | None = None
        self.thaw_at = -1.0


class _FreezingTail(StageServer):
    """A tail replica that may be the one :class:`_Freeze` falls on."""

    freeze: _Freeze

    async def handle_tail(self, caller, request):
        freeze = self.freeze
        if freeze.armed and freeze.replica is None:
            freeze.replica, freeze.thaw_at = self, self.rt.now() + FREEZE_S
        if freeze.replica is self and self.rt.now() < freeze.thaw_at:
            await self.rt.sleep(freeze.thaw_at - self.rt.now())
        return await super().handle_tail(caller, request)


def _frozen_replica_run(backend, hedge_quantile):
    """2 stages, the tail served twice; one tail replica freezes at its first call once ``FREEZE_AFTER`` micro-batches
    are done (the trainer has the latencies a hedge deadline needs). The trainer's stats, the time each micro-batch was
    done, the thaw time and the samples each stage accumulated once the frozen calls have run."""
    batch = torch.randint(0, CFG.vocab_size, (2 * MICRO_BATCHES, 17), generator=torch.Generator().manual_seed(0))
    stages = build_stages(CFG, 2, seed=3)

    async def scenario(runtimes):
        servers = []
        freeze = _Freeze()
        for name, stage, cls in (("s0", 0, StageServer), ("s1a", 1, _FreezingTail), ("s1b", 1, _FreezingTail)):
            compute = TensorStageCompute(stages[stage] if name != "s1b" else build_stages(CFG, 2, seed=3)[1], OptimConfig(),
                                         DenseCodec())
            servers.append(cls(runtimes[name], "run", compute, AveragingConfig(10**6, progress_period_s=5.0), throughput=1.0,
                               bandwidth_mbps=50))
            servers[-1].freeze = freeze
        # every replica's record is stored before the trainer's first read: with one missing there (a loaded machine,
        # a fresh-clone CI run), the trainer knew one tail replica until its next discovery, after the run
        await runtimes["trainer"].gather([server.rt.spawn(server.start()) for server in servers])
        done = []

        def on_micro_batch(record):
            done.append(record["time_s"])
            if len(done) == FREEZE_AFTER:
                freeze.armed = True

        trainer = Trainer(
            runtimes["trainer"], "run", 2, FixedBatch(batch, 2),
            TrainerConfig(micro_batches=MICRO_BATCHES, micro_batches_per_step=2, schedule="async", max_inflight=2,
                          hedge_quantile=hedge_quantile),
            on_micro_batch,
        )
        stats = await trainer.run()
        await trainer.rt.sleep(max(0.0, freeze.thaw_at - trainer.rt.now()) + 1.0)  # the frozen calls have run through
        return stats, done, freeze.thaw_at, [servers[0].stats.samples, servers[1].stats.samples + servers[2].stats.samples]

    return run_scenario(backend, ["trainer", "s0", "s1a", "s1b"], scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_to_a_frozen_replica_is_hedged_to_the_other_and_accumulated_once(backend):
    stats, done, thaw_at, accumulated = _frozen_replica_run(backend, hedge_quantile=0.95)
    assert thaw_at > 0 and stats.micro_batches_done == MICRO_BATCHES and stats.micro_batches_dropped == 0 and stats.failed_requests == 0
    assert stats.hedges_won >= 1 and stats.hedged_requests >= stats.hedges_won
    # the frozen replica ran its calls after the thaw (they accumulated), the hedges asked for the input gradient only
    assert stats.unaccumulated_retries == stats.hedged_requests
    assert accumulated == [stats.samples, stats.samples]


def test_a_frozen_replica_costs_the_hedge_deadline_not_the_freeze():
    """Virtual time: without hedging the micro-batch stuck on the frozen replica holds the window for the whole freeze."""
    def longest_gap(hedge_quantile):
        stats, done, thaw_at, _ = _frozen_replica_run("sim", hedge_quantile)
        return max(b - a for a, b in zip(done, done[1:])), stats

    unhedged, stats = longest_gap(None)
    hedged, hedged_stats = longest_gap(0.95)
    assert stats.hedged_requests == 0 and unhedged > FREEZE_S * 0.9
    latencies = sorted(hedged_stats.request_seconds["tail"])
    assert hedged < FREEZE_S * 0.1 and hedged < 3 * latencies[-1]
