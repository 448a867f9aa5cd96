"""The direct pipeline (``topology.pipeline=direct``): stage to stage, exactly the single-process model, on virtual time."""

import pytest
import torch

from node0sim.config import ConfigError, TopologyConfig
from node0sim.experiment import SpecMicroBatches
from node0sim.model import build_stages, stage_shapes
from node0sim.model.subspace import make_basis
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.codecs import DenseCodec, SubspaceCodec
from node0sim.protocol.direct import DirectConfig, hop_timeout, retry_accumulate_below
from node0sim.protocol.messages import HEADER_BYTES, PIPE_BACKWARD, PipeBackwardRequest
from node0sim.protocol.stage_compute import CostStageCompute, OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.trainer import Trainer, TrainerConfig
from node0sim.runtime import RemoteError
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG, FixedBatch, _pipeline_step, _run_pipeline, assert_same_gradients, single_process_step


@pytest.mark.parametrize("num_stages,schedule", [(1, "sync"), (2, "sync"), (4, "sync"), (4, "async")])
@pytest.mark.parametrize("direct_schedule", ["1f1b", "gpipe"])
def test_a_direct_pipeline_step_equals_the_single_process_model(num_stages, schedule, direct_schedule):
    batch = torch.randint(0, CFG.vocab_size, (6, 17), generator=torch.Generator().manual_seed(0))
    computes, stats = _pipeline_step(num_stages, batch, 2, schedule, 10**6, pipeline="direct", direct_schedule=direct_schedule)
    loss, expected = single_process_step(batch)
    assert stats.micro_batches_done == 3 and stats.failed_requests == 0 and stats.retried_requests == 0
    assert sum(stats.losses) / len(stats.losses) == pytest.approx(loss, abs=1e-5)
    assert_same_gradients(computes, expected, batch.shape[0])
    # the trainer talks to stage 0 only (and, with GPipe, to the tail to start each backward)
    assert set(stats.stage_bytes) == ({0} if direct_schedule == "1f1b" or num_stages == 1 else {0, num_stages - 1})


@pytest.mark.parametrize("direct_schedule", ["1f1b", "gpipe"])
def test_a_direct_step_updates_every_stage_once_with_the_relayed_pipelines_weights(direct_schedule):
    batch = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    relayed, _ = _pipeline_step(3, batch, 2, "sync", 4)
    direct, _ = _pipeline_step(3, batch, 2, "sync", 4, pipeline="direct", direct_schedule=direct_schedule)
    assert [c.updates for c in direct] == [1, 1, 1]
    for a, b in zip(direct, relayed):
        for (name, p), (_, q) in zip(a.module.named_parameters(), b.module.named_parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_the_direct_pipeline_carries_the_subspace_codecs_token_ids_from_stage_0():
    basis = make_basis(CFG.dim, 8, CFG.vocab_size, seed=11)
    batch = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(2))
    _, relayed = _pipeline_step(4, batch, 2, "sync", 10**6, SubspaceCodec(8, basis), basis)
    _, direct = _pipeline_step(4, batch, 2, "sync", 10**6, SubspaceCodec(8, basis), basis, pipeline="direct")
    assert direct.failed_requests == 0
    assert direct.losses == pytest.approx(relayed.losses, abs=1e-6)


def _messages_s(sizes, latency_s, mbps):
    """Seconds of messages sent one after another, each alone on its links: latency + 8 bytes / bandwidth."""
    return sum(latency_s + 8 * size / (mbps * 1e6) for size in sizes)


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("pipeline,direct_schedule", [("relayed", "1f1b"), ("direct", "1f1b"), ("direct", "gpipe")])
def test_one_micro_batch_takes_each_message_on_its_own_link_once(num_stages, pipeline, direct_schedule):
    """Timing mode, one micro-batch on 1 Mb/s links: the messages are sent one after another (relayed: every one to or
    from the trainer; direct: stage to stage), so the time is their sum plus the stages' compute."""
    batch, seq_len, latency_s, mbps = 2, 16, 0.03, 1.0
    computes = [CostStageCompute(CFG, i, num_stages, layers, DenseCodec(), torch.float32)
                for i, (layers, _, _) in enumerate(stage_shapes(CFG, num_stages))]
    sim = make_sim(latency_s)
    stats = _run_pipeline(computes, SpecMicroBatches(batch, seq_len), 1, "sync", 10**6, sim=sim, pipeline=pipeline,
                          direct_schedule=direct_schedule, mbps=mbps)
    assert stats.micro_batches_done == 1 and stats.failed_requests == 0
    act, tokens = batch * seq_len * CFG.dim * 4, batch * seq_len * 8  # float32 activations; int64 ids and targets
    origin = len("trainer")
    last = num_stages - 1
    if pipeline == "relayed":
        forwards = [HEADER_BYTES + tokens] + [HEADER_BYTES + act] * (2 * last - 1)  # requests and responses
        tail = [HEADER_BYTES + act + tokens, HEADER_BYTES + 4 + act]  # inputs and targets; loss and gradient
        backwards = [HEADER_BYTES + 2 * act, HEADER_BYTES + act] * (last - 1) + [HEADER_BYTES + tokens + act, HEADER_BYTES]
        sizes = forwards + tail + backwards
    else:
        forwards = [HEADER_BYTES + origin + tokens + tokens] + [HEADER_BYTES + origin + act + tokens] * last
        backwards = [HEADER_BYTES + origin + act] * last  # the gradients, tail to head
        acks = [HEADER_BYTES + 4] * last  # the backward chain's responses
        returns = [HEADER_BYTES + 4 + len(f"s{last}")] * num_stages  # the forward chain's: the loss and the tail's id
        sizes = forwards + backwards + acks + returns
        if direct_schedule == "gpipe":  # the trainer starts the backward at the tail
            sizes += [HEADER_BYTES + origin, HEADER_BYTES + 4]
    compute_s = sum(sim.peers[f"s{i}"].busy_s for i in range(num_stages))
    assert sim.env.now - stats.last_start_s == pytest.approx(_messages_s(sizes, latency_s, mbps) + compute_s, rel=1e-9)


def _crash(sim, servers):
    sim.peers["s1a"].crash()


def _refuse_forwards(sim, servers):
    sim.peers["s1a"].runtime.serve("pipe_forward", _refuse)


def _no_next_peer_once(sim, servers):
    hops = servers["s0"].direct
    routed = hops._next_peer

    async def next_peer(samples):
        hops._next_peer = routed
        return None

    hops._next_peer = next_peer


def _failing_pipeline(direct_schedule, sabotage=_crash):
    """Three stages, two peers on stage 1: ``s1a`` announces a higher throughput (so it is routed to first); at 1 s,
    before training, ``sabotage(sim, servers)`` (default: ``s1a`` crashes); one step of three micro-batches. Returns the
    trainer's stats, each server's accumulated samples and the training's virtual time."""
    sim = make_sim(latency_s=0.02)
    batch = torch.randint(0, CFG.vocab_size, (6, 17), generator=torch.Generator().manual_seed(0))
    stages = build_stages(CFG, 3, seed=3)
    servers = {}
    for name, stage, throughput in [("s0", 0, 1.0), ("s1a", 1, 10.0), ("s1b", 1, 1.0), ("s2", 2, 1.0)]:
        peer = add(sim, name, 50, 50)
        compute = TensorStageCompute(stages[stage] if name != "s1b" else build_stages(CFG, 3, seed=3)[1],
                                     OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec())
        servers[name] = StageServer(peer.runtime, "run", compute, AveragingConfig(10**6, progress_period_s=5.0),
                                    throughput=throughput, bandwidth_mbps=50, direct=DirectConfig(3, request_timeout_s=2.0))
        peer.runtime.spawn(servers[name].start())
    trainer_peer = add(sim, "trainer", 50, 50)
    cfg = TrainerConfig(micro_batches=3, micro_batches_per_step=3, request_timeout_s=2.0, pipeline="direct",
                        direct_schedule=direct_schedule)
    trainer = Trainer(trainer_peer.runtime, "run", 3, FixedBatch(batch, 2), cfg, lambda record: None)

    async def train():
        await trainer_peer.runtime.sleep(1.0)
        sabotage(sim, servers)
        started = trainer_peer.runtime.now()
        stats = await trainer.run()
        return trainer_peer.runtime.now() - started, stats

    task = trainer_peer.runtime.spawn(train())
    sim.run(until=task.process)
    elapsed_s, stats = task.process.value
    return stats, {name: server.stats.samples for name, server in servers.items()}, elapsed_s


async def _refuse(caller, request):
    raise ValueError("refused for the test")


@pytest.mark.parametrize("direct_schedule", ["1f1b", "gpipe"])
def test_a_crashed_hop_fails_the_try_back_to_the_trainer_which_retries_it_on_another_path(direct_schedule):
    stats, samples, _ = _failing_pipeline(direct_schedule)
    assert stats.micro_batches_done == 3 and stats.micro_batches_dropped == 0 and stats.micro_batches_in_flight == 0
    # s0 routed the first tries to s1a (it announced more), timed out once per try in flight, then banned it
    assert stats.failed_requests == stats.timed_out_requests == stats.retried_requests >= 1
    # a timed-out forward hop from s0, which still kept its input: s0 accumulates the retry (no backward passed its
    # input, and it drops it now); 1F1B: stages 1 and 2 may have run the try's backward, so they are left out (the price
    # when s1a really crashed: the relayed mode pays it too); GPipe: only the tail may have run it, and it is left out
    lost = 2 * stats.failed_requests
    assert samples["s0"] == 6 and samples["s1a"] == 0
    assert samples["s1b"] == (6 - lost if direct_schedule == "1f1b" else 6)
    assert samples["s2"] == 6 - lost
    assert stats.unaccumulated_retries == stats.failed_requests


@pytest.mark.parametrize("direct_schedule", ["1f1b", "gpipe"])
def test_a_refused_hop_is_retried_and_every_stage_accumulates_the_micro_batch_once(direct_schedule):
    stats, samples, _ = _failing_pipeline(direct_schedule, _refuse_forwards)
    assert stats.micro_batches_done == 3 and stats.failed_requests == stats.retried_requests >= 1
    assert stats.timed_out_requests == 0 and stats.unaccumulated_retries == 0
    assert samples == {"s0": 6, "s1a": 0, "s1b": 6, "s2": 6}


def test_a_stage_without_a_peer_makes_the_trainer_wait_a_discovery_period_before_the_retry():
    stats, samples, elapsed_s = _failing_pipeline("1f1b", _no_next_peer_once)
    assert stats.micro_batches_done == 3 and stats.micro_batches_dropped == 0
    assert stats.failed_requests == stats.no_peer_requests == stats.retried_requests == 1 and stats.unaccumulated_retries == 0
    assert samples == {"s0": 6, "s1a": 6, "s1b": 0, "s2": 6}
    assert elapsed_s > TrainerConfig(1, 1).discovery_period_s


def test_a_backward_without_its_kept_forward_is_refused_by_name():
    sim = make_sim()
    compute = TensorStageCompute(build_stages(CFG, 2, seed=0)[0], OptimConfig(), DenseCodec())
    server_peer, client = add(sim, "s0"), add(sim, "c")
    server = StageServer(server_peer.runtime, "run", compute, AveragingConfig(8, progress_period_s=5.0), throughput=1.0,
                         bandwidth_mbps=50, direct=DirectConfig(2))
    server_peer.runtime.spawn(server.start())

    async def protocol():
        await client.runtime.sleep(0.1)
        try:
            await client.runtime.call("s0", PIPE_BACKWARD, PipeBackwardRequest(0, "c", 1, 0, torch.zeros(1, 4, CFG.dim)), 5)
        except RemoteError as error:
            return str(error)

    task = client.runtime.spawn(protocol())
    sim.run(until=task.process)
    assert "keeps no forward of micro-batch ('c', 1, 0)" in task.process.value


def test_inner_hops_time_out_before_the_calls_that_wait_for_them():
    timeouts = [hop_timeout(3.0, 4, stage, False, True) for stage in range(4)]
    assert timeouts == [3.0 * (4 - stage + 3) for stage in range(4)]  # 1F1B: the forwards left, then 3 backwards
    assert [hop_timeout(3.0, 4, stage, True, False) for stage in (3, 2, 1, 0)] == [12.0, 9.0, 6.0, 3.0]
    # a refused backward at stage 1 of 4: stages 2 and 3 accumulated; a timed-out one: stage 1 may have too
    assert retry_accumulate_below("refused", 1, True, False, 4) == 2 and retry_accumulate_below("timeout", 1, True, False, 4) == 1
    assert retry_accumulate_below("timeout", 2, False, False, 4) == 3  # GPipe forward: only the tail may have run it
    assert retry_accumulate_below("timeout", 2, False, True, 4, caller_kept_input=True) == 2
    assert retry_accumulate_below("timeout", 2, False, True, 4) == 0


@pytest.mark.parametrize("overrides,message", [
    ({"pipeline": "p2p"}, "topology.pipeline: 'p2p' is not one of ['relayed', 'direct']"),
    ({"schedule": "interleaved"}, "topology.schedule: 'interleaved' is not one of ['1f1b', 'gpipe']"),
    ({"pipeline": "direct", "tail_calls": "separate"}, "topology.tail_calls: separate needs topology.pipeline=relayed"),
])
def test_bad_pipeline_keys_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TopologyConfig(**overrides)
