"""The compute cost models (flat and roofline), the operations they charge, and the memory check before a run."""

import math
from pathlib import Path

import pytest
import torch

from node0sim.config import ConfigError
from node0sim.model.costs import (
    ComputeCost,
    Matmul,
    optimizer_step_cost,
    stage_forward_cost,
    stage_forward_flops,
    stage_memory,
    stage_parameter_count,
    stage_shapes,
    stage_training_cost,
)
from node0sim.model.llama import ModelConfig
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.messages import TensorSpec
from node0sim.protocol.stage_compute import CostStageCompute
from node0sim.sim.gpus import MATMUL_CURVES, FlatCompute, RooflineCompute, gpu_profile
from node0sim.sim.runner import SimulatedRun
from tests.runs import run_config, simulate
from tests.simutil import make_sim
from tools.bench_compute import fit_curve, read_table

TINY = ModelConfig(**run_config("model=tiny", "model.vocab_size=257", "sim.numerics=false").model)
NODE0_8B = ModelConfig(**run_config("model=node0_8b", "sim.numerics=false").model)


@pytest.mark.parametrize("cfg", [TINY, NODE0_8B], ids=["tiny", "node0_8b"])
def test_the_operations_of_a_stage_add_up_to_its_flops(cfg):
    for index, shape in enumerate(stage_shapes(cfg, 2)):
        forward = stage_forward_flops(cfg, *shape, batch=2, seq_len=64)
        assert stage_forward_cost(cfg, *shape, 2, 64).flops == pytest.approx(forward)
        assert stage_training_cost(cfg, *shape, 2, 64).flops == pytest.approx(3 * forward)
        compute = CostStageCompute(cfg, index, 2, shape[0], DenseCodec(), torch.bfloat16)
        inputs = TensorSpec((2, 64), torch.int64)
        assert compute.forward_cost(inputs).flops == pytest.approx(compute.forward_flops(inputs))
        assert compute.backward_cost(inputs).flops == pytest.approx(compute.backward_flops(inputs))


def test_the_flat_model_charges_every_flop_at_peak_times_utilization():
    cost = stage_training_cost(TINY, range(0, 2), True, False, 4, 128)
    l4 = gpu_profile("l4")
    assert FlatCompute(l4.peak_flops * 0.4).seconds(cost) == pytest.approx(cost.flops / (121e12 * 0.4))


def test_the_roofline_prices_the_optimizer_step_by_its_memory_traffic():
    params = 218_000_000  # about one node0_8b layer
    h100 = gpu_profile("h100")
    cost = optimizer_step_cost(params, state_tensors=2, flops_per_param=12)
    seconds = RooflineCompute(h100, "bfloat16").seconds(cost)
    # AdamW reads parameter, gradient and both moments and writes parameter and moments: 7 fp32 values per parameter
    assert seconds == pytest.approx(7 * 4 * params / 3.35e12)
    assert seconds > 12 * params / 67e12  # the FLOP time at the FP32 peak is shorter: memory bound


def test_the_roofline_prices_a_large_matmul_by_its_flops_at_the_curves_efficiency():
    h100, curve = gpu_profile("h100"), MATMUL_CURVES["bfloat16"]
    big = Matmul(1, 8192, 8192, 8192, "rhs")
    flops = 2 * 8192**3
    seconds = RooflineCompute(h100, "bfloat16").seconds(ComputeCost((big,)))
    assert seconds == pytest.approx(curve.fixed_s + flops / (curve.max_efficiency * 989e12))
    assert seconds > 2 * 3 * 8192**2 / 3.35e12  # its bytes (two bf16 inputs and the output) move faster: FLOP bound


def test_small_matmuls_are_less_efficient_and_a_tall_skinny_one_is_memory_bound():
    h100, curve = gpu_profile("h100"), MATMUL_CURVES["bfloat16"]
    sizes = [2 * n**3 for n in (128, 512, 2048, 8192)]
    efficiencies = [curve.efficiency(f, h100.peak("bfloat16")) for f in sizes]
    assert efficiencies == sorted(efficiencies) and efficiencies[-1] < curve.max_efficiency
    skinny = Matmul(1, 65536, 8, 4096, "rhs")  # 8 FLOPs per byte moved in bf16
    model = RooflineCompute(h100, "bfloat16")
    assert model.seconds(ComputeCost((skinny,))) == pytest.approx(skinny.bytes_moved(2) / 3.35e12)


def test_fp32_without_tensor_cores_is_slower_than_tf32_and_bf16():
    cost = stage_training_cost(NODE0_8B, range(1, 2), False, False, 1, 4096)
    seconds = {dtype: RooflineCompute(gpu_profile("l4"), dtype).seconds(cost) for dtype in ("bfloat16", "tf32", "float32")}
    assert seconds["bfloat16"] < seconds["tf32"] < seconds["float32"]


def test_batched_requests_merge_into_larger_products():
    one, two = (stage_forward_cost(TINY, range(0, 2), True, False, b, 128) for b in (1, 2))
    merged = ComputeCost.merge([one, two])
    assert merged == stage_forward_cost(TINY, range(0, 2), True, False, 3, 128)
    model = RooflineCompute(gpu_profile("a100"), "bfloat16")
    assert model.seconds(merged) < model.seconds(one) + model.seconds(two)


def test_a_simulated_peer_charges_its_compute_models_time_plus_the_call_overhead():
    sim = make_sim()
    model = RooflineCompute(gpu_profile("h100"), "bfloat16")
    peer = sim.add_peer("p", region="r", up_mbps=1, down_mbps=1, gpu=gpu_profile("h100"), call_overhead_s=1e-4,
                        compute_model=model)
    cost = stage_training_cost(TINY, range(0, 2), True, False, 4, 128)
    task = peer.runtime.spawn(peer.runtime.compute(cost))
    sim.run(until=task.process)
    assert sim.env.now == pytest.approx(model.seconds(cost) + 1e-4)


def test_stage_memory_counts_weights_optimizer_state_and_activations():
    layers, is_head, is_tail = stage_shapes(TINY, 2)[1]
    memory = stage_memory(TINY, layers, is_head, is_tail, micro_batch=4, seq_len=128, element_bytes=2, requests_per_call=1,
                          queued_bytes=1e6, state_tensors=2)
    params = stage_parameter_count(TINY, layers, is_head, is_tail)
    s, b, h = 128, 4, 128
    assert (memory.weights, memory.gradients, memory.optimizer_state) == (4 * params, 4 * params, 8 * params)
    # Korthikanti et al. 2022: 34 s b h bytes per layer in 16 bits (no stored scores); the tail adds logits and their gradient
    assert memory.activations == pytest.approx(2 * 34 * s * b * h + 2 * s * b * 257 * 2)
    assert memory.queued_requests == 1e6 and memory.total == pytest.approx(16 * params + memory.activations + 1e6)


def test_a_stage_that_does_not_fit_is_refused_before_the_run_naming_the_numbers(tmp_path):
    # node0_8b's tail in fp32 with 4 sequences per micro-batch: 16 B x 424M parameters, 11.2 GB of activations
    overrides = ("experiment=headline", "network=datacenter", "sim.gpu=t4", "sim.compute_dtype=float32",
                 "train.micro_batch_size=4", "train.batch_size=128", "wandb.enabled=false")
    with pytest.raises(ConfigError, match=r"sim\.check_memory: 1 of 32 stages do not fit on t4 \(16 GB\); stage 31 needs 18\.0 GB: "
                                          r"weights 1\.7 GB, .* activations of one call \(1 x 4 x 4096 tokens, float32\) 11\.2 GB"):
        SimulatedRun(run_config(*overrides), tmp_path)
    summary = simulate(tmp_path, *overrides, "sim.check_memory=false", "train.max_sim_time_s=1")  # a sweep can go past it
    assert summary["sim_time_s"] == pytest.approx(1.0)


def test_compute_model_keys_are_validated():
    with pytest.raises(ConfigError, match="sim.compute_model"):
        run_config("sim.compute_model=exact")
    with pytest.raises(ConfigError, match="sim.compute_dtype"):
        run_config("sim.compute_dtype=fp8")


def test_the_bench_tools_fit_recovers_a_known_curve():
    flops = [2 * n**3 for n in (64, 256, 1024, 4096)]
    fixed_s, rate = fit_curve(flops, [5e-6 + f / 300e12 for f in flops])
    assert fixed_s == pytest.approx(5e-6) and rate == pytest.approx(300e12)


@pytest.mark.parametrize("dtype", ["bfloat16", "tf32"])
def test_the_matmul_curves_are_the_fit_to_the_published_h100_measurements(dtype):
    rows = read_table(Path(__file__).parents[1] / "tools/data/h100_matmul_xla.csv", dtype)
    fixed_s, rate = fit_curve([2.0 * math.prod(shape) for shape, _ in rows], [seconds for _, seconds in rows])
    curve = MATMUL_CURVES[dtype]
    assert fixed_s == pytest.approx(curve.fixed_s, rel=0.01)
    assert rate / gpu_profile("h100").peak(dtype) == pytest.approx(curve.max_efficiency, rel=0.01)
