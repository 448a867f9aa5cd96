"""Stage servers merge waiting same-kind requests into one accelerator call; results equal unbatched ones."""

import copy

import pytest
import torch

from node0sim.model import build_stages
from node0sim.model.costs import ComputeCost, stage_shapes
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.batching import BatchingQueue
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.messages import BackwardRequest, ForwardRequest, TailRequest
from node0sim.protocol.stage_compute import CostStageCompute, OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.runtime import RemoteError
from node0sim.sim.gpus import gpu_profile
from tests.simutil import make_sim
from tests.test_pipeline import CFG

STAGES = build_stages(CFG, 3, seed=5)
SEQ = 8
SIZES = [1, 2, 3, 1, 2, 2, 1]
"""Sequences per request: request 0 is sent first and runs alone, the others queue behind it."""


def _requests(kind: str, bad: dict[int, str] | None = None) -> list:
    """One request per entry of SIZES for stage 1 (forward, backward) or the tail (stage 2), some malformed."""
    gen = torch.Generator().manual_seed(11)
    requests = []
    for i, size in enumerate(SIZES):
        hidden = torch.randn(size, SEQ, CFG.dim, generator=gen)
        grad = torch.randn(size, SEQ, CFG.dim, generator=gen)
        targets = torch.randint(0, CFG.vocab_size, (size, SEQ), generator=gen)
        fault = (bad or {}).get(i)
        if fault == "shape":
            hidden = hidden[..., :7]
        elif fault == "nan":
            hidden[0, 0, 0] = float("nan")
        elif fault == "dtype":
            grad, targets = grad.double(), targets.float()
        if kind == "forward":
            requests.append(ForwardRequest(1, hidden))
        elif kind == "backward":
            requests.append(BackwardRequest(1, hidden, grad))
        else:
            requests.append(TailRequest(2, hidden, targets))
    return requests


def _serve(kind: str, limit: int, requests: list, compute=None):
    """Send ``requests`` to one server on a slow GPU (so they queue); its results, server and call sizes."""
    sim = make_sim(latency_s=0.01)
    gpu = gpu_profile("rtx3090")
    server_peer = sim.add_peer("server", region="r", up_mbps=1e4, down_mbps=1e4, gpu=gpu, utilization=1e-6)
    client = sim.add_peer("client", region="r", up_mbps=1e4, down_mbps=1e4, gpu=gpu, utilization=0.4)
    stage = 2 if kind == "tail" else 1
    compute = compute or TensorStageCompute(copy.deepcopy(STAGES[stage]), OptimConfig(lr=3e-4, warmup_steps=0), DenseCodec())
    server = StageServer(
        server_peer.runtime, "run", compute, AveragingConfig(target_batch_size=10**6, progress_period_s=5.0),
        throughput=1.0, bandwidth_mbps=1e4, max_batch_requests=limit,
    )
    sizes: list[int] = []
    for name in ("forward_batch", "backward_batch", "tail_batch"):
        original = getattr(compute, name)
        setattr(compute, name, lambda works, run=original: sizes.append(len(works)) or run(works))

    async def one(request):
        try:
            return await client.runtime.call("server", kind, request, timeout=1e6)
        except RemoteError as error:
            return error

    async def protocol():
        await server.start()
        first = client.runtime.spawn(one(requests[0]))
        await client.runtime.sleep(1e-3)  # the others arrive while the first one computes
        rest = [client.runtime.spawn(one(r)) for r in requests[1:]]
        return await client.runtime.gather([first, *rest])

    task = client.runtime.spawn(protocol())
    sim.run(until=task.process)
    return task.process.value, server, sizes, server_peer


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to fp32 precision: within 1e-6 of the values' scale (summation order differs in a batch)."""
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())


def _values(kind: str, response) -> list:
    if kind == "forward":
        return [response.outputs]
    if kind == "backward":
        return [response.grad_inputs]
    return [torch.tensor(response.loss), response.grad_inputs]


@pytest.mark.parametrize("kind", ["forward", "backward", "tail"])
def test_batched_results_and_gradients_equal_unbatched_ones(kind):
    requests = _requests(kind)
    alone, alone_server, alone_sizes, _ = _serve(kind, 1, requests)
    batched, server, sizes, _ = _serve(kind, 4, requests)
    assert alone_sizes == [1] * len(SIZES)
    assert sizes == [1, 4, 2]  # the first alone, then the six waiting ones in calls of at most 4
    assert server.stats.request_calls == 3 and server.stats.batched_requests == len(SIZES)
    for one, merged in zip(alone, batched):
        for a, b in zip(_values(kind, one), _values(kind, merged)):
            _close(b, a)
    counted = 0 if kind == "forward" else sum(SIZES)
    assert server.samples == alone_server.samples == counted
    _close(server.compute.take_gradients(), alone_server.compute.take_gradients())


@pytest.mark.parametrize("kind", ["forward", "backward", "tail"])
def test_a_bad_request_in_a_batch_is_rejected_alone(kind):
    bad = {2: "shape", 4: "nan"} if kind == "forward" else {2: "shape", 4: "nan", 5: "dtype"}
    requests = _requests(kind, bad)
    good = [r for i, r in enumerate(requests) if i not in bad]
    batched, server, sizes, _ = _serve(kind, 8, requests)
    alone, alone_server, _, _ = _serve(kind, 1, good)
    # the malformed requests were in the merged call; a non-finite one is refused at the trust boundary, before batching
    assert sizes == [1, len(SIZES) - 1 - list(bad.values()).count("nan")]
    reasons = {"shape": "got (3, 8, 7)", "nan": "finite", "dtype": "targets" if kind == "tail" else "float64"}
    for i, fault in bad.items():
        assert isinstance(batched[i], RemoteError) and reasons[fault] in str(batched[i]), batched[i]
    accepted = [r for i, r in enumerate(batched) if i not in bad]
    for one, merged in zip(alone, accepted):
        for a, b in zip(_values(kind, one), _values(kind, merged)):
            _close(b, a)
    assert server.samples == alone_server.samples
    _close(server.compute.take_gradients(), alone_server.compute.take_gradients())


def test_timing_mode_batches_sum_flops_and_pay_the_call_overhead_once():
    layers, is_head, is_tail = stage_shapes(CFG, 3)[1]
    busy = {}
    for limit in (1, 4):
        compute = CostStageCompute(CFG, 1, 3, layers, DenseCodec(), torch.float32)
        requests = _requests("backward")
        _, server, sizes, peer = _serve("backward", limit, requests, compute)
        flops = sum(compute.backward_flops(r.inputs) for r in requests)
        assert peer.call_overhead_s == 0.0 and peer.busy_s == pytest.approx(flops / peer.flops_per_s)
        busy[limit] = len(sizes)
    assert busy == {1: len(SIZES), 4: 3}


def test_call_overhead_makes_one_batched_call_cheaper_than_several():
    sim = make_sim()
    peer = sim.add_peer("p", region="r", up_mbps=1, down_mbps=1, gpu=gpu_profile("t4"), utilization=0.5, call_overhead_s=0.01)

    async def work():
        for _ in range(3):
            await peer.runtime.compute(65e12 * 0.5)  # one second of FLOPs each
        await peer.runtime.compute(0.0)  # bookkeeping without work pays no overhead
        await peer.runtime.compute(3 * 65e12 * 0.5)

    task = peer.runtime.spawn(work())
    sim.run(until=task.process)
    assert sim.env.now == pytest.approx(3 * 1.01 + 3.01) and peer.busy_s == pytest.approx(6.04)


def test_summary_reports_batched_calls(tmp_path):
    from tests.test_swarm_protocol import _run

    summary = _run(tmp_path, "topology.num_stages=2", "train.steps=20", "topology.max_batch_requests=3").execute()
    requests = summary["request_calls"] * summary["mean_requests_per_call"]
    assert summary["micro_batches_done"] * 3 <= round(requests)  # forward, tail, backward per micro-batch
    assert 1.0 < summary["mean_requests_per_call"] <= 3.0


# ---- the queue alone ------------------------------------------------------------------------------

def _queue_run(limit: int, requests: list[tuple[str, int]], fail_calls_of: str | None = None):
    """Submit ``(kind, item)`` requests (the first alone, the rest while it computes) to a BatchingQueue whose
    calls double each item (and reject negative ones); the results (or errors) and the calls made."""
    sim = make_sim()
    peer = sim.add_peer("p", region="r", up_mbps=1, down_mbps=1, gpu=gpu_profile("t4"), utilization=1e-9)
    calls: list[tuple[str, list[int]]] = []

    def run_batch(kind, items):
        calls.append((kind, list(items)))
        if kind == fail_calls_of:
            raise RuntimeError("the accelerator failed")
        return [ValueError(f"bad item {i}") if i < 0 else (kind, 2 * i) for i in items]

    queue = BatchingQueue(peer.runtime, run_batch, limit)

    async def one(kind, item):
        try:
            return await queue.submit(kind, item, ComputeCost(elementwise_flops=1e3))
        except Exception as error:
            return error

    async def protocol():
        first = peer.runtime.spawn(one(*requests[0]))
        await peer.runtime.sleep(1e-6)
        rest = [peer.runtime.spawn(one(*r)) for r in requests[1:]]
        return await peer.runtime.gather([first, *rest])

    task = peer.runtime.spawn(protocol())
    sim.run(until=task.process)
    return task.process.value, calls


def test_queue_serves_the_oldest_kind_first_with_up_to_the_limit_of_its_kind():
    requests = [("f", 0), ("f", 1), ("b", 2), ("f", 3), ("b", 4), ("f", 5), ("b", 6)]
    results, calls = _queue_run(2, requests)
    assert calls == [("f", [0]), ("f", [1, 3]), ("b", [2, 4]), ("f", [5]), ("b", [6])]
    assert results == [(kind, 2 * item) for kind, item in requests]


def test_queue_without_batching_makes_one_call_per_request_in_arrival_order():
    requests = [("f", 0), ("b", 1), ("f", 2)]
    results, calls = _queue_run(1, requests)
    assert calls == [("f", [0]), ("b", [1]), ("f", [2])]
    assert results == [("f", 0), ("b", 2), ("f", 4)]


def test_queue_rejects_a_request_alone_and_a_failed_call_fails_its_batch_only():
    results, _ = _queue_run(4, [("f", 0), ("f", 1), ("f", -1), ("f", 2)])
    assert results[:2] == [("f", 0), ("f", 2)] and results[3] == ("f", 4)
    assert isinstance(results[2], ValueError) and "bad item -1" in str(results[2])
    results, calls = _queue_run(4, [("f", 0), ("b", 1), ("f", 2), ("b", 3)], fail_calls_of="b")
    assert calls == [("f", [0]), ("b", [1, 3]), ("f", [2])]
    assert results[0] == ("f", 0) and results[2] == ("f", 4)
    assert all(isinstance(results[i], RuntimeError) for i in (1, 3))


def test_queue_needs_a_positive_limit():
    peer = make_sim().add_peer("p", region="r", up_mbps=1, down_mbps=1, gpu=gpu_profile("t4"), utilization=1.0)
    with pytest.raises(ValueError, match="max_batch_requests"):
        BatchingQueue(peer.runtime, lambda kind, items: items, 0)
