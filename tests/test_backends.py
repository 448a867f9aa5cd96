"""The same protocol scenarios on both backends: the SimPy emulator and live hivemind peers on 127.0.0.1."""

import pytest
import torch

from node0sim.model import Llama, build_stages
from node0sim.protocol.averaging import AveragingConfig, GroupAverager
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.trainer import Trainer, TrainerConfig
from tests.backends import BACKENDS, run_scenario
from tests.test_pipeline import CFG, FixedBatch

pytestmark = pytest.mark.slow


def _pipeline(num_stages: int, batch: torch.Tensor, micro: int):
    computes = [TensorStageCompute(s, OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec()) for s in build_stages(CFG, num_stages, seed=3)]

    async def scenario(runtimes):
        for i, compute in enumerate(computes):
            # a target batch the run never reaches: gradients stay accumulated for the check
            server = StageServer(runtimes[f"s{i}"], "run", compute, AveragingConfig(10**6, progress_period_s=5.0), throughput=1.0, bandwidth_mbps=50)
            runtimes[f"s{i}"].spawn(server.start())
        micro_batches = batch.shape[0] // micro
        trainer = Trainer(
            runtimes["trainer"], "run", num_stages, FixedBatch(batch, micro),
            TrainerConfig(micro_batches=micro_batches, micro_batches_per_step=micro_batches, schedule="async"),
            lambda record: None,
        )
        return await trainer.run()

    return computes, scenario


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pipeline_step_equals_the_single_process_model_on_both_backends(backend):
    batch = torch.randint(0, CFG.vocab_size, (6, 17), generator=torch.Generator().manual_seed(0))
    computes, scenario = _pipeline(3, batch, micro=2)
    stats = run_scenario(backend, ["trainer", "s0", "s1", "s2"], scenario)

    reference = Llama(CFG, seed=3)
    logits = reference(batch[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), batch[:, 1:].reshape(-1)).backward()
    assert stats.micro_batches_done == 3 and stats.failed_requests == 0
    expected = dict(reference.named_parameters())
    for compute in computes:
        for name, param in compute.module.named_parameters():
            torch.testing.assert_close(param.grad / 6, expected[name].grad, atol=1e-6, rtol=1e-4)


def _averager_for(backend):
    if backend == "swarm/hivemind":
        from swarm.allreduce import HivemindGroupAverager

        return HivemindGroupAverager
    return GroupAverager


async def _install_routers(backend, runtimes):
    if backend == "swarm/hivemind":
        from swarm.allreduce import install

        for rt in runtimes.values():
            await install(rt)


@pytest.mark.parametrize("backend", [*BACKENDS, "swarm/hivemind"])
def test_all_reduce_gives_every_member_the_sample_weighted_average_on_both_backends(backend):
    names = ["a", "b", "c"]
    sums = {"a": torch.arange(1000.0) * 2, "b": torch.ones(1000) * 30, "c": -torch.arange(1000.0)}
    weights = {"a": 2.0, "b": 3.0, "c": 5.0}

    async def scenario(runtimes):
        await _install_routers(backend, runtimes)
        averagers = {n: _averager_for(backend)(runtimes[n], 0, AveragingConfig(8, averaging_timeout_s=20.0)) for n in names}
        for averager in averagers.values():
            averager.serve()
        members = sorted(runtimes[n].peer_id for n in names)
        tasks = [runtimes[n].spawn(averagers[n].all_reduce("r", members, [10.0, 20.0, 30.0], sums[n], weights[n])) for n in names]
        return await runtimes["a"].gather(tasks)

    expected = (sums["a"] + sums["b"] + sums["c"]) / 10.0
    for result, contributors in run_scenario(backend.split("/")[0], names, scenario):
        assert contributors == 3
        torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("backend", [*BACKENDS, "swarm/hivemind"])
def test_a_member_that_never_shows_up_costs_the_others_at_most_the_averaging_timeout(backend):
    names = ["a", "b", "c"]
    timeout = 4.0

    async def scenario(runtimes):
        await _install_routers(backend, runtimes)
        averagers = {n: _averager_for(backend)(runtimes[n], 0, AveragingConfig(8, averaging_timeout_s=timeout)) for n in names}
        for averager in averagers.values():
            averager.serve()
        members = sorted(runtimes[n].peer_id for n in names)
        started = runtimes["a"].now()
        vectors = {"a": torch.full((6000,), 2.0), "b": torch.full((6000,), 4.0)}  # "c" is in the group but silent
        tasks = [runtimes[n].spawn(averagers[n].all_reduce("r", members, [1.0, 1.0, 1.0], vectors[n], 1.0)) for n in "ab"]
        results = await runtimes["a"].gather(tasks)
        return results, runtimes["a"].now() - started, [averagers[n].timeouts for n in "ab"]

    results, elapsed, timeouts = run_scenario(backend.split("/")[0], names, scenario)
    assert elapsed <= timeout * 1.6
    assert all(t >= 1 for t in timeouts)
    for result, contributors in results:
        assert contributors == 2
        # the parts a and b own are averaged (3.0); the silent member's part keeps each peer's own values
        assert (result == 3.0).sum() >= 2000
