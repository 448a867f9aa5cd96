"""The steady-state throughput estimate against analytic bounds, on virtual time."""

import pytest

from node0sim.model.costs import hidden_bytes, stage_forward_flops, stage_shapes
from node0sim.model.llama import ModelConfig
from node0sim.protocol.messages import HEADER_BYTES
from node0sim.sim.gpus import gpu_profile
from node0sim.summary import steady_throughput
from tests.runs import run_config, simulate

TIMING = ("sim.numerics=false", "train.schedule=async", "train.eval_batches=0", "wandb.enabled=false")


def _steps(times: list[float], tokens_per_step: int) -> list[dict]:
    return [{"step": i + 1, "time_s": t, "tokens": (i + 1) * tokens_per_step} for i, t in enumerate(times)]


def test_the_steady_window_ends_where_the_pipeline_starts_to_drain():
    # a step every second until the drain at t = 10, then the last steps arrive faster (less queueing behind them)
    records = _steps([float(t) for t in range(1, 11)] + [10.2, 10.4], tokens_per_step=100)
    assert steady_throughput(records, drain_start_s=10.0) == pytest.approx(100.0)
    assert steady_throughput(records) > 100.0  # the window that ends at the last completion counts the drain
    assert steady_throughput(records, drain_start_s=1.5) is None  # one step before the drain: no rate


def test_the_steady_window_starts_after_two_generations_of_micro_batches_in_flight():
    # 4 steps of 100 tokens arrive fast (the first micro-batches, all started at once), then one a second
    records = _steps([0.5, 0.7, 0.9, 1.0] + [float(t) for t in range(2, 10)], tokens_per_step=100)
    assert steady_throughput(records, fill_tokens=400) == pytest.approx(100.0)  # a fill shorter than half: the midpoint rules
    assert steady_throughput(records, fill_tokens=900) == pytest.approx(100.0)  # from step 9 (t = 6) to step 12
    assert steady_throughput(records[:6]) > 100.0  # the second half of 6 steps is still in the fill
    assert steady_throughput(records[:6], fill_tokens=400) == pytest.approx(100.0)
    assert steady_throughput(records, drain_start_s=6.0, fill_tokens=900) is None  # no step between fill and drain


def _tail_bound(run) -> float:
    """Tokens/s the tail stage can serve at most: one fused forward + backward call (3 forward passes of FLOPs, at
    ``peak x utilization``) plus the call overhead per micro-batch."""
    cfg = ModelConfig(**run.model)
    layers, is_head, is_tail = stage_shapes(cfg, run.topology.num_stages)[-1]
    batch, seq_len = run.train.micro_batch_size, run.train.seq_len
    flops = 3 * stage_forward_flops(cfg, layers, is_head, is_tail, batch, seq_len)
    seconds = flops / (gpu_profile(run.sim.gpu).peak_flops * run.sim.utilization) + run.sim.call_overhead_ms / 1000
    return batch * seq_len / seconds


@pytest.mark.parametrize("trainers, inflight", [(8, 2), (4, 4), (16, 2)])
def test_a_compute_bound_pipeline_runs_at_its_tail_bound_and_never_above(tmp_path, trainers, inflight):
    # the tail (one layer + a 4096-word LM head) costs 2.5x the head: it limits the pipeline
    overrides = (*TIMING, "model=tiny", "model.vocab_size=4096", "model.n_layers=2", "topology.num_stages=2",
                 "network=datacenter", "sim.utilization=0.001", "train.steps=120", f"topology.num_trainers={trainers}",
                 f"train.max_inflight={inflight}")
    bound = _tail_bound(run_config(*overrides))
    steady = simulate(tmp_path, *overrides)["tokens_per_s_steady"]
    assert 0.98 * bound <= steady <= bound


@pytest.mark.slow
@pytest.mark.parametrize("inflight, steps", [(2, 16), (4, 32)])
def test_the_dense_datacenter_headline_stays_under_its_tail_bound(tmp_path, inflight, steps):
    # the estimator used to report 17,876 tok/s at 2 in flight, above the tail's 17,620 (it counted the pipeline's
    # drain), and 18,115 at 4 in flight (16 steps: its window, steps 4 to 8, lay in the fill)
    overrides = ("experiment=headline", "network=datacenter", "compression=none", "wandb.enabled=false",
                 f"train.max_inflight={inflight}", f"train.steps={steps}")
    bound = _tail_bound(run_config(*overrides))
    steady = simulate(tmp_path, *overrides)["tokens_per_s_steady"]
    assert 0.98 * bound <= steady <= bound


@pytest.mark.slow
def test_a_headline_run_too_short_for_its_in_flight_work_has_no_steady_rate(tmp_path):
    # 16 steps at 4 in flight (128 micro-batches, 4 steps' worth): the drain starts at step 8, where the fill ends
    overrides = ("experiment=headline", "network=datacenter", "compression=none", "wandb.enabled=false",
                 "train.max_inflight=4", "train.steps=16")
    assert simulate(tmp_path, *overrides)["tokens_per_s_steady"] is None


def test_a_link_bound_pipeline_runs_at_its_trainers_uplink_bound(tmp_path):
    # one trainer relays everything: per micro-batch its uplink carries the token ids to the head, the activations and
    # targets to the tail, and the token ids with the output gradient back to the head; downlinks are 10x faster
    overrides = (*TIMING, "model=tiny", "model.vocab_size=257", "topology.num_stages=2", "network.up_mbps=100",
                 "network.down_mbps=1000", "network.latency_ms=5", "sim.dht_latency_ms=0", "train.max_inflight=10",
                 "train.steps=150")
    run = run_config(*overrides)
    cfg = ModelConfig(**run.model)
    batch, seq_len = run.train.micro_batch_size, run.train.seq_len
    token_bytes = batch * seq_len * 8  # int64 ids and targets
    up_bytes = 2 * hidden_bytes(cfg, batch, seq_len, 2) + 3 * token_bytes + 3 * HEADER_BYTES  # bf16 activations
    bound = batch * seq_len / (up_bytes / (run.network.up_mbps * 1e6 / 8))
    steady = simulate(tmp_path, *overrides)["tokens_per_s_steady"]
    assert steady == pytest.approx(bound, rel=0.02)
