"""One training step over the emulated network equals the same model run in one process."""

import pytest
import torch

from node0sim.model import Llama, ModelConfig, build_stages
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.trainer import Trainer, TrainerConfig
from tests.simutil import add, make_sim

CFG = ModelConfig(
    name="t", vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=None,
    multiple_of=16, rope_theta=10000.0, max_seq_len=32, qk_norm=True, norm_reorder=True, trainable_rmsnorm=False,
)


class FixedBatch:
    """Serves the micro-batches of one fixed global batch, in order."""

    def __init__(self, batch: torch.Tensor, micro: int):
        self.parts = list(batch.split(micro))

    def next_micro_batch(self):
        window = self.parts.pop(0)
        return window[:, :-1], window[:, 1:]


def _pipeline_step(num_stages: int, batch: torch.Tensor, micro: int, schedule: str, update_every: int):
    sim = make_sim(latency_s=0.02)
    computes = [TensorStageCompute(s, OptimConfig(lr=1e-2)) for s in build_stages(CFG, num_stages, seed=3)]
    for i, compute in enumerate(computes):
        peer = add(sim, f"s{i}", 50, 50)
        peer.runtime.spawn(StageServer(peer.runtime, "run", compute, update_every_samples=update_every).start())
    trainer_peer = add(sim, "trainer", 50, 50)
    steps = []
    trainer = Trainer(
        trainer_peer.runtime, "run", num_stages, FixedBatch(batch, micro),
        TrainerConfig(steps=1, micro_batches_per_step=batch.shape[0] // micro, schedule=schedule), steps.append,
    )
    task = trainer_peer.runtime.spawn(trainer.run())
    sim.run(until=task.process)
    return computes, steps, trainer.stats


@pytest.mark.parametrize("num_stages,schedule", [(2, "sync"), (4, "sync"), (4, "async")])
def test_one_step_over_the_network_matches_single_process(num_stages, schedule):
    batch = torch.randint(0, CFG.vocab_size, (6, 17), generator=torch.Generator().manual_seed(0))
    computes, steps, stats = _pipeline_step(num_stages, batch, micro=2, schedule=schedule, update_every=10**6)

    reference = Llama(CFG, seed=3)
    logits = reference(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), batch[:, 1:].reshape(-1))
    loss.backward()

    assert stats.micro_batches_done == 3 and stats.failed_requests == 0
    assert steps[0]["loss"] == pytest.approx(loss.item(), abs=1e-5)
    expected = dict(reference.named_parameters())
    checked = 0
    for compute in computes:
        for name, param in compute.module.named_parameters():
            torch.testing.assert_close(param.grad / 6, expected[name].grad, atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == len(expected)


def test_stages_update_once_per_global_batch_and_weights_change():
    batch = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in Llama(CFG, seed=3).parameters()]
    computes, _, _ = _pipeline_step(2, batch, micro=2, schedule="sync", update_every=4)
    assert [c.updates for c in computes] == [1, 1]
    after = [p for c in computes for p in c.module.parameters()]
    assert len(after) == len(before)
    assert all(p.grad is None for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_wrong_stage_request_is_rejected_not_served():
    from node0sim.protocol.messages import ForwardRequest
    from node0sim.runtime import RemoteError

    sim = make_sim()
    compute = TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig())
    server_peer, client = add(sim, "s1"), add(sim, "c")
    server_peer.runtime.spawn(StageServer(server_peer.runtime, "run", compute, 8).start())

    async def protocol():
        errors = []
        for request in (ForwardRequest(0, torch.zeros(1, 4, CFG.dim)), ForwardRequest(1, torch.zeros(1, 4, 7)),
                        ForwardRequest(1, torch.full((1, 4, CFG.dim), float("nan")))):
            try:
                await client.runtime.call("s1", "forward", request, timeout=5)
            except RemoteError as error:
                errors.append(str(error))
        return errors

    task = client.runtime.spawn(protocol())
    sim.run(until=task.process)
    first, second, third = task.process.value
    assert "stage 0" in first and "stage 1" in first
    assert "shape" in second
    assert "finite" in third or "NaN" in third
