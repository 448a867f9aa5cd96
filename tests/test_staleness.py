"""Delay accounting and weight stashing of asynchronous pipeline updates, on virtual time."""

import copy
import json

import pytest
import torch

from node0sim.config import ConfigError
from node0sim.model import ModelConfig, build_stages
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.messages import BACKWARD, FORWARD, TAIL, BackwardRequest, ForwardRequest, TailRequest
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute, Work
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.staleness import MAX_COUNTED_DELAY, StalenessStats, WeightHistory, mean_delay
from node0sim.protocol.trainer import Trainer, TrainerConfig
from node0sim.sim.runner import run_simulation
from tests.runs import run_config
from tests.simutil import add, make_sim

CFG = ModelConfig(
    name="t", vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=None,
    multiple_of=16, rope_theta=10000.0, max_seq_len=32, qk_norm=True, norm_reorder=True, trainable_rmsnorm=False,
)
MICRO = 2  # sequences per micro-batch, and the target batch: every backward is followed by its stage's update


def _micro_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = torch.randint(0, CFG.vocab_size, (count * MICRO, 17), generator=torch.Generator().manual_seed(seed))
    return [(part[:, :-1], part[:, 1:]) for part in tokens.split(MICRO)]


def _servers(sim, num_stages: int, **server_options) -> list[StageServer]:
    """One stage server per stage, each stepping after every micro-batch (target batch = micro batch)."""
    servers = []
    for i, stage in enumerate(build_stages(CFG, num_stages, seed=3)):
        peer = add(sim, f"s{i}", 50, 50)
        compute = TensorStageCompute(stage, OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec())
        server = StageServer(
            peer.runtime, "run", compute, AveragingConfig(MICRO, progress_period_s=5.0), throughput=1.0, bandwidth_mbps=50,
            **server_options,
        )
        peer.runtime.spawn(server.start())
        servers.append(server)
    return servers


async def _one_forward_one_backward(rt, num_stages: int, batches: list) -> None:
    """PipeDream's 1F1B steady state, run in order: at step i micro-batch i goes forward through every stage (the
    tail runs its forward and backward), then each stage k runs the backward of micro-batch i - (num_stages-1-k),
    so num_stages-1-k micro-batches are in flight downstream of stage k when it serves a backward."""
    last = num_stages - 1
    inputs: dict[int, list] = {}
    epochs: dict[int, list[int]] = {}
    grads: dict[tuple[int, int], torch.Tensor] = {}  # (micro-batch, stage): gradient of the stage's output
    for step in range(len(batches) + last):
        if step < len(batches):
            tokens, targets = batches[step]
            inputs[step], epochs[step] = [tokens], []
            for stage in range(last):
                response = await rt.call(f"s{stage}", FORWARD, ForwardRequest(stage, inputs[step][-1]), 10)
                inputs[step].append(response.outputs)
                epochs[step].append(response.epoch)
            tail = await rt.call(f"s{last}", TAIL, TailRequest(last, inputs[step][last], targets), 10)
            grads[step, last - 1] = tail.grad_inputs
        for stage in reversed(range(last)):
            mb = step - (last - stage)
            if 0 <= mb < len(batches):
                request = BackwardRequest(stage, inputs[mb][stage], grads.pop((mb, stage)), epoch=epochs[mb][stage])
                response = await rt.call(f"s{stage}", BACKWARD, request, 10)
                if stage:
                    grads[mb, stage - 1] = response.grad_inputs


@pytest.mark.parametrize("num_stages", [2, 4])
def test_the_measured_delay_is_the_depth_downstream_of_each_stage(num_stages):
    sim = make_sim(latency_s=0.01)
    servers = _servers(sim, num_stages)
    driver = add(sim, "driver", 50, 50)
    count = 6
    task = driver.runtime.spawn(_one_forward_one_backward(driver.runtime, num_stages, _micro_batches(count)))
    sim.run(until=task.process)
    for stage, server in enumerate(servers):
        depth = num_stages - 1 - stage  # micro-batches in flight downstream, each one update (target = micro batch)
        # micro-batch j's forward at stage k is followed by the backwards of the min(j, depth) micro-batches ahead of it
        expected = [0] * (depth + 1)
        for j in range(count):
            expected[min(j, depth)] += 1
        assert server.stats.staleness.delay_counts == expected, stage
        assert server.epoch == count


def _train(schedule: str, max_inflight: int, steps: int) -> list[StageServer]:
    sim = make_sim(latency_s=0.01)
    servers = _servers(sim, 3)
    peer = add(sim, "trainer", 50, 50)

    class Source:
        batches = _micro_batches(steps, seed=1)

        def next_micro_batch(self):
            return self.batches.pop(0)

    cfg = TrainerConfig(micro_batches=steps, micro_batches_per_step=1, schedule=schedule, max_inflight=max_inflight)
    trainer = Trainer(peer.runtime, "run", 3, Source(), cfg, lambda record: None)
    task = peer.runtime.spawn(trainer.run())
    sim.run(until=task.process)
    return servers


def test_async_with_zero_delay_is_the_synchronous_schedule():
    steps = 4
    synchronous, asynchronous = _train("sync", 1, steps), _train("async", 1, steps)
    for sync_server, async_server in zip(synchronous, asynchronous):
        assert async_server.stats.staleness.delay_counts == [steps]  # one micro-batch in flight: no delay
        assert async_server.epoch == sync_server.epoch == steps
        assert torch.equal(sync_server.compute.parameter_values(None), async_server.compute.parameter_values(None))


def test_with_stashing_the_backward_uses_the_forward_weights_and_the_update_the_current_ones():
    sim = make_sim()
    (head, _) = _servers(sim, 2, delay_history=4, weight_stashing=True)
    initial = head.compute.parameter_values(None)
    (a, _), (b, _) = _micro_batches(2)
    grad = torch.randn(MICRO, 16, CFG.dim, generator=torch.Generator().manual_seed(5))

    async def protocol():
        stamped = await head.handle_forward("t", ForwardRequest(0, a))
        await head.handle_forward("t", ForwardRequest(0, b))
        await head.handle_backward("t", BackwardRequest(0, b, grad, epoch=0))  # b's update: epoch 1
        before = copy.deepcopy(head.compute)
        await head.handle_backward("t", BackwardRequest(0, a, grad, epoch=stamped.epoch))
        return before

    task = head.rt.spawn(protocol())
    sim.run(until=task.process)
    assert head.epoch == 2 and head.stats.staleness.delay_counts == [1, 1]

    def redo(forward_weights: torch.Tensor) -> torch.Tensor:
        """a's update by hand: its gradient at ``forward_weights``, applied to the epoch-1 weights."""
        compute = copy.deepcopy(task.process.value)
        current = compute.parameter_values(None)
        compute.set_parameter_values(forward_weights, None)
        compute.backward_batch([Work(a, grad_outputs=grad)])
        compute.set_parameter_values(current, None)
        compute.apply_update(MICRO)
        return compute.parameter_values(None)

    assert torch.equal(head.compute.parameter_values(None), redo(initial))
    assert not torch.equal(head.compute.parameter_values(None), redo(task.process.value.parameter_values(None)))


def test_weight_history_keeps_the_newest_epochs():
    history = WeightHistory(2)
    for epoch in range(4):
        history.record(epoch, torch.full((3,), float(epoch)))
    assert history.get(1) is None and torch.equal(history.get(3), torch.full((3,), 3.0)) and 2 in history
    with pytest.raises(ValueError, match="train.delay_history"):
        WeightHistory(0)


def test_staleness_stats_measure_the_gap_and_the_lookahead_cosine():
    stats = StalenessStats()
    for tau in (0, 2, 2):
        stats.count_delay(tau)
    assert stats.delay_counts == [1, 0, 2] and mean_delay(stats.delay_counts) == pytest.approx(4 / 3)
    forward, previous, current = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])
    stats.measure(current, forward, previous)  # the last update points along the whole gap: cosine 1
    stats.measure(forward, forward, previous)  # no gap: no cosine
    assert stats.weight_gap_sum == 2.0 and stats.weight_gap_count == 2
    assert stats.lookahead_cosine_sum == pytest.approx(1.0) and stats.lookahead_cosine_count == 1


@pytest.mark.parametrize(
    "overrides,reason",
    [
        (["topology.peers_per_stage=2"], "topology.peers_per_stage is 2"),
        (["churn=poisson"], "churn is 'poisson'"),
        (["topology.rebalance_period_s=300"], "topology.rebalance_period_s is 300"),
    ],
)
def test_stashing_is_refused_where_any_peer_of_a_stage_may_serve_the_backward(overrides, reason):
    permitted = ["topology.weight_stashing=true", "topology.rebalance_period_s=0", "train.delay_history=4"]
    assert run_config(*permitted).topology.weight_stashing
    with pytest.raises(ConfigError, match="topology.weight_stashing: any peer of a stage may serve the backward") as error:
        run_config(*permitted, *overrides)
    assert reason in str(error.value)
    with pytest.raises(ConfigError, match="topology.weight_stashing: needs train.delay_history"):
        run_config("topology.weight_stashing=true", "topology.rebalance_period_s=0")


def test_a_run_reports_its_staleness_in_the_summary_and_the_metrics(tmp_path):
    run = run_config(
        "topology.num_stages=3", "train.schedule=async", "train.steps=8", "train.batch_size=2", "train.micro_batch_size=2",
        "train.seq_len=16", "train.eval_batches=0", "train.delay_history=8", "wandb.enabled=false",
    )
    summary = run_simulation(run, tmp_path)
    assert summary["delay_per_stage"][-1] == 0.0 and summary["delay_histogram_per_stage"][-1] == [8]
    assert all(sum(h) == 8 for h in summary["delay_histogram_per_stage"])
    assert summary["weight_gap_per_stage"][-1] == 0.0 and summary["weight_gap_per_stage"][0] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (staleness,) = [r for r in records if r.get("event") == "staleness"]
    assert staleness["delay_per_stage"] == summary["delay_per_stage"]


def test_the_delay_histogram_stays_bounded_whatever_epoch_a_server_was_told():
    """Bug (noticed while fuzzing the handlers): an epoch of 2^62 adopted from a forged DHT record made one backward's
    delay size the histogram to 2^62 entries (MemoryError). Larger delays now count in the last bucket."""
    stats = StalenessStats()
    stats.count_delay(2)
    stats.count_delay(2**62)
    stats.count_delay(MAX_COUNTED_DELAY)
    assert len(stats.delay_counts) == MAX_COUNTED_DELAY + 1
    assert stats.delay_counts[2] == 1 and stats.delay_counts[-1] == 2 and sum(stats.delay_counts) == 3
