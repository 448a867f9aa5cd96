"""One training step over the emulated network equals the same model run in one process."""

import pytest
import torch

from node0sim.experiment import SpecMicroBatches
from node0sim.model import Llama, ModelConfig, build_stages, stage_shapes
from node0sim.model.costs import stage_forward_flops
from node0sim.model.subspace import make_basis, project_gradients_onto_subspace_, subspace_residual
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.codecs import DenseCodec, SubspaceCodec
from node0sim.protocol.direct import DirectConfig
from node0sim.protocol.messages import HEADER_BYTES
from node0sim.protocol.stage_compute import CostStageCompute, OptimConfig, TensorStageCompute
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


def _run_pipeline(computes, source, micro_batches, schedule, update_every, tail_calls="fused", sim=None, pipeline="relayed",
                  direct_schedule="1f1b", mbps=50):
    """Serve ``computes`` (one peer each, ``s0``...) and push ``micro_batches`` from ``source``: the trainer's stats."""
    sim = sim or make_sim(latency_s=0.02)
    direct = DirectConfig(len(computes)) if pipeline == "direct" else None
    for i, compute in enumerate(computes):
        peer = add(sim, f"s{i}", mbps, mbps)
        averaging = AveragingConfig(update_every, progress_period_s=5.0)
        server = StageServer(peer.runtime, "run", compute, averaging, throughput=1.0, bandwidth_mbps=mbps, direct=direct)
        peer.runtime.spawn(server.start())
    trainer_peer = add(sim, "trainer", mbps, mbps)
    trainer = Trainer(
        trainer_peer.runtime, "run", len(computes), source,
        TrainerConfig(
            micro_batches=micro_batches, micro_batches_per_step=micro_batches, schedule=schedule,
            send_token_ids=computes[0].codec.needs_token_ids, tail_calls=tail_calls, pipeline=pipeline,
            direct_schedule=direct_schedule,
        ),
        lambda record: None,
    )
    task = trainer_peer.runtime.spawn(trainer.run())
    sim.run(until=task.process)
    return trainer.stats


def _pipeline_step(num_stages, batch, micro, schedule, update_every, codec=None, basis=None, tail_calls="fused", **direct):
    fixed = basis.fixed_embedding if basis is not None else None
    computes = [
        TensorStageCompute(s, OptimConfig(lr=1e-2, warmup_steps=0), codec or DenseCodec(), basis)
        for s in build_stages(CFG, num_stages, seed=3, fixed_embedding=fixed)
    ]
    stats = _run_pipeline(computes, FixedBatch(batch, micro), batch.shape[0] // micro, schedule, update_every, tail_calls, **direct)
    return computes, stats


@pytest.mark.parametrize("num_stages,schedule", [(2, "sync"), (4, "sync"), (4, "async")])
def test_one_step_over_the_network_matches_single_process(num_stages, schedule):
    batch = torch.randint(0, CFG.vocab_size, (6, 17), generator=torch.Generator().manual_seed(0))
    computes, stats = _pipeline_step(num_stages, batch, micro=2, schedule=schedule, update_every=10**6)

    loss, expected = single_process_step(batch)
    assert stats.micro_batches_done == 3 and stats.failed_requests == 0
    assert sum(stats.losses) / len(stats.losses) == pytest.approx(loss, abs=1e-5)
    assert_same_gradients(computes, expected, batch.shape[0])


def single_process_step(batch):
    """The single-process model's loss and (after backward) named parameters on ``batch``."""
    reference = Llama(CFG, seed=3)
    logits = reference(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), batch[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), dict(reference.named_parameters())


def assert_same_gradients(computes, expected, samples):
    """Every stage's accumulated gradient (a sum over ``samples``) is the single-process model's mean gradient."""
    checked = 0
    for compute in computes:
        for name, param in compute.module.named_parameters():
            torch.testing.assert_close(param.grad / samples, expected[name].grad, atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == len(expected)


def test_stages_update_once_per_global_batch_and_weights_change():
    batch = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in Llama(CFG, seed=3).parameters()]
    computes, _ = _pipeline_step(2, batch, micro=2, schedule="sync", update_every=4)
    assert [c.updates for c in computes] == [1, 1]
    after = [p for c in computes for p in c.module.parameters()]
    assert len(after) == len(before)
    assert all(p.grad is None or not p.grad.any() for p in after)  # accumulation restarted
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_wrong_stage_request_is_rejected_not_served():
    from node0sim.protocol.messages import ForwardRequest
    from node0sim.runtime import RemoteError

    sim = make_sim()
    compute = TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig(lr=3e-4, warmup_steps=0), DenseCodec())
    server_peer, client = add(sim, "s1"), add(sim, "c")
    server = StageServer(server_peer.runtime, "run", compute, AveragingConfig(8, progress_period_s=5.0), throughput=1.0, bandwidth_mbps=50)
    server_peer.runtime.spawn(server.start())

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


def test_subspace_wire_codec_gives_the_same_loss_and_gradients_as_the_constrained_model_without_it():
    basis = make_basis(CFG.dim, 8, CFG.vocab_size, seed=11)
    batch = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(2))
    wire, wire_stats = _pipeline_step(4, batch, 2, "sync", 10**6, SubspaceCodec(8, basis), basis)
    dense, dense_stats = _pipeline_step(4, batch, 2, "sync", 10**6, DenseCodec(), basis)
    assert wire_stats.losses == pytest.approx(dense_stats.losses, abs=1e-6)
    # the wire carries k = 8 numbers per token instead of 32, plus the token ids
    assert wire_stats.stage_bytes[1] < dense_stats.stage_bytes[1] / 2
    for with_codec, without in zip(wire, dense):
        project_gradients_onto_subspace_(with_codec.module, basis)
        project_gradients_onto_subspace_(without.module, basis)
        for (name, a), (_, b) in zip(with_codec.module.named_parameters(), without.module.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_subspace_reconstruction_stays_exact_through_training_over_the_network():
    basis = make_basis(CFG.dim, 8, CFG.vocab_size, seed=11)
    batch = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(4))
    computes, _ = _pipeline_step(4, batch, 2, "sync", 2, SubspaceCodec(8, basis), basis)
    assert all(c.updates >= 1 for c in computes)
    ids = batch[:, :-1]
    x = ids
    for compute in computes[:-1]:
        x = compute.module(x)
        assert subspace_residual(x, ids, basis) <= 1e-5


@pytest.mark.parametrize("num_stages,subspace", [(1, False), (3, False), (3, True)])
def test_separate_tail_calls_give_the_fused_tails_loss_and_gradients(num_stages, subspace):
    basis = make_basis(CFG.dim, 8, CFG.vocab_size, seed=11) if subspace else None
    codec = SubspaceCodec(8, basis) if subspace else None
    batch = torch.randint(0, CFG.vocab_size, (6, 17), generator=torch.Generator().manual_seed(5))
    fused, fused_stats = _pipeline_step(num_stages, batch, 2, "sync", 10**6, codec, basis)
    separate, stats = _pipeline_step(num_stages, batch, 2, "sync", 10**6, codec, basis, tail_calls="separate")
    assert stats.micro_batches_done == 3 and stats.failed_requests == 0
    assert stats.losses == pytest.approx(fused_stats.losses, abs=1e-6)
    checked = 0
    for with_calls, with_tail in zip(separate, fused):
        for (name, a), (_, b) in zip(with_calls.module.named_parameters(), with_tail.module.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
            checked += 1
    assert checked == len(list(Llama(CFG, seed=3).parameters()))


def test_a_tail_backward_without_targets_is_rejected():
    compute = TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig(), DenseCodec())
    with pytest.raises(ValueError, match="targets"):
        compute.backward(torch.zeros(1, 4, CFG.dim), None, torch.zeros(1, 4))


@pytest.mark.parametrize("tail_calls,passes", [("fused", 3), ("separate", 4)])
def test_timing_mode_charges_the_tail_3F_fused_and_4F_in_separate_calls(tail_calls, passes):
    batch, seq_len, dim = 2, 16, CFG.dim
    computes = [
        CostStageCompute(CFG, i, 2, layers, DenseCodec(), torch.float32) for i, (layers, _, _) in enumerate(stage_shapes(CFG, 2))
    ]
    sim = make_sim()
    stats = _run_pipeline(computes, SpecMicroBatches(batch, seq_len), 1, "sync", 10**6, tail_calls, sim)
    tail = sim.peers["s1"]
    forward = stage_forward_flops(CFG, computes[1].layer_range, False, True, batch, seq_len)  # F; backward 2F
    assert stats.micro_batches_done == 1 and stats.losses == []
    assert tail.busy_s == pytest.approx(passes * forward / tail.flops_per_s)
    activations, ids, losses = batch * seq_len * dim * 4, batch * seq_len * 8, batch * seq_len * 4
    if tail_calls == "fused":  # tail request (activations, targets), response (loss, gradient)
        expected = (HEADER_BYTES + activations + ids) + (HEADER_BYTES + 4 + activations)
    else:  # forward (activations, targets) -> per-token loss; backward (activations, its gradient, targets) -> gradient
        expected = (HEADER_BYTES + activations + ids) + (HEADER_BYTES + losses) + (
            HEADER_BYTES + activations + losses + ids) + (HEADER_BYTES + activations)
    assert stats.stage_bytes[1] == expected
