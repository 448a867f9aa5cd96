"""Stage records that nobody serves (issue 14, found 4: "2,000 fake peers in a stage's record: 0 steps in 45 s"):
entries under ids no peer has, and peers that accept calls and never answer. With ``probe_timeout_s`` a trainer gives
work only to peers that answered a probe for their stage; without it, such entries cost micro-batches."""

import pytest
import torch

from node0sim.model import build_stages
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.messages import PROBE, ProbeRequest
from node0sim.protocol.progress import StageRecord, stage_key
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.trainer import Trainer, TrainerConfig
from node0sim.runtime import RemoteError
from tests.backends import BACKENDS, run_scenario
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG, FixedBatch

MICRO_BATCHES = 16
LIAR_THROUGHPUT = 1e12
"""What every sybil announces: the router would send it everything first."""
GHOST = StageRecord(epoch=0, samples=0, rate=0.0, time=0.0, throughput=LIAR_THROUGHPUT, bandwidth=100.0, ready=True,
                    averaging=None)


class _Hanging(StageServer):
    """A server that accepts every call of its stage and never answers."""

    async def _hang(self, caller, request):
        await self.rt.sleep(10**6)

    handle_forward = handle_backward = handle_tail = handle_probe = _hang


def _start_servers(runtimes, hanging: int) -> list[StageServer]:
    """An honest server for each of 2 stages, and ``hanging`` servers of the tail stage announcing ``LIAR_THROUGHPUT``."""
    stages = build_stages(CFG, 2, seed=0)
    servers = []
    for name, stage, cls in [("s0", 0, StageServer), ("s1", 1, StageServer), *((f"hang{i}", 1, _Hanging) for i in range(hanging))]:
        throughput = LIAR_THROUGHPUT if cls is _Hanging else 1.0
        compute = TensorStageCompute(stages[stage] if cls is StageServer else build_stages(CFG, 2, seed=0)[stage], OptimConfig(),
                                     DenseCodec())
        servers.append(cls(runtimes[name], "run", compute, AveragingConfig(10**6, progress_period_s=1.0), throughput=throughput,
                           bandwidth_mbps=50))
        runtimes[name].spawn(servers[-1].start())
    return servers


def _trainer(runtime, probe_timeout_s) -> Trainer:
    batch = torch.randint(0, CFG.vocab_size, (2 * MICRO_BATCHES, 17), generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(micro_batches=MICRO_BATCHES, micro_batches_per_step=2, schedule="async", max_inflight=2,
                        probe_timeout_s=probe_timeout_s, discovery_period_s=1.0)
    return Trainer(runtime, "run", 2, FixedBatch(batch, 2), cfg, lambda record: None)


def _sim_run(ghosts: int, hanging: int, probe_timeout_s: float | None):
    """Virtual time: ``ghosts`` tail entries under ids no peer has, ``hanging`` tail servers that never answer."""
    sim = make_sim(latency_s=0.01, dht_latency_s=0.01)
    names = ["trainer", "s0", "s1", *(f"hang{i}" for i in range(hanging))]
    runtimes = {name: add(sim, name, 50, 50).runtime for name in names}
    for i in range(ghosts):
        sim.dht.store(stage_key("run", 1), f"ghost{i}", GHOST.to_dht(), 10**6)
    servers = _start_servers(runtimes, hanging)
    trainer = _trainer(runtimes["trainer"], probe_timeout_s)
    task = runtimes["trainer"].spawn(trainer.run())
    sim.run(until=task.process)
    return trainer, servers


@pytest.mark.parametrize("ghosts,hanging", [(200, 0), (0, 3)])
def test_without_probes_entries_nobody_serves_cost_micro_batches(ghosts, hanging):
    """The attack, as it stands by default: a call to an id no peer has fails at once, one to a hanging server after the
    request timeout, and each takes one of a micro-batch's 4 tries."""
    trainer, _ = _sim_run(ghosts, hanging, probe_timeout_s=None)
    stats = trainer.stats
    assert stats.failed_probes == 0 and (stats.lost_requests > 0, stats.timed_out_requests > 0) == (ghosts > 0, hanging > 0)
    if ghosts:  # more entries than tries: micro-batches dropped
        assert stats.micro_batches_dropped > 0
    else:  # one try on each hanging server, then the honest one: the run waits out their timeouts
        assert stats.timed_out_requests >= hanging and trainer.rt.now() > hanging * trainer.cfg.request_timeout_s


@pytest.mark.parametrize("ghosts,hanging", [(200, 0), (0, 3), (200, 3)])
def test_with_probes_no_work_goes_to_a_peer_that_never_answered(ghosts, hanging):
    trainer, servers = _sim_run(ghosts, hanging, probe_timeout_s=0.5)  # shorter than the run: every probe ends in it
    stats = trainer.stats
    assert stats.micro_batches_done == MICRO_BATCHES and stats.micro_batches_dropped == 0
    assert stats.failed_requests == 0  # every request went to an honest server and was answered
    assert stats.failed_probes == ghosts + hanging  # each sybil was probed once, then banned for longer than the run
    sybils = [f"ghost{i}" for i in range(ghosts)] + [f"hang{i}" for i in range(hanging)]
    assert all(not trainer.router.state(1, peer).proven and trainer.router.state(1, peer).banned_until > 0 for peer in sybils)
    assert [s.stats.samples for s in servers[2:]] == [0] * hanging
    assert servers[1].stats.samples == MICRO_BATCHES * 2


def test_a_server_of_another_stage_refuses_the_probe():
    sim = make_sim()
    runtimes = {name: add(sim, name).runtime for name in ("client", "s0", "s1")}
    _start_servers(runtimes, hanging=0)
    sim.run(until=1.0)

    async def probe():
        with pytest.raises(RemoteError, match="request for stage 1 sent to a server of stage 0"):
            await runtimes["client"].call("s0", PROBE, ProbeRequest(1), 5.0)
        return await runtimes["client"].call("s1", PROBE, ProbeRequest(1), 5.0)

    task = runtimes["client"].spawn(probe())
    sim.run(until=task.process)
    assert task.process.value.stage == 1


@pytest.mark.parametrize("backend", [b if b == "sim" else pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS])
def test_a_hanging_tail_server_announcing_1e12_samples_per_s_gets_no_work_on_both_backends(backend):
    async def scenario(runtimes):
        servers = _start_servers(runtimes, hanging=1)
        trainer = _trainer(runtimes["trainer"], probe_timeout_s=10.0)  # whether the probe ends within the run or not
        stats = await trainer.run()
        return stats, servers[1].stats.samples, servers[2].stats.samples

    stats, honest_samples, hanging_samples = run_scenario(backend, ["trainer", "s0", "s1", "hang0"], scenario)
    assert stats.micro_batches_done == MICRO_BATCHES and stats.failed_requests == 0 and stats.failed_probes <= 1
    assert (honest_samples, hanging_samples) == (MICRO_BATCHES * 2, 0)
