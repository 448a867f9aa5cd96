"""One code path for both modes: TensorSpec follows torch's shapes, and timing mode puts numerics mode's bytes on the wire."""

import pytest
import torch

from node0sim.protocol.averaging import AveragingConfig, GroupAverager
from node0sim.protocol.powersgd import PowerSGD
from node0sim.protocol.tensors import TensorSpec, all_finite, cat, orthonormalize, randn_like, zeros_like
from tests.simutil import add, make_sim


def _spec(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(tensor.shape), tensor.dtype)


def _in_place_sum(x):
    total = x.clone()
    total += x
    total += 1.5
    return total


OPERATIONS = {
    "slice along dim 0": lambda x: x[3:17],
    "open slice": lambda x: x[:5],
    "reshape with -1": lambda x: x.reshape(4, -1),
    "view with a tuple": lambda x: x.view((2, 3, 4)),
    "transpose": lambda x: x.reshape(4, 6).T,
    "matrix product": lambda x: x.reshape(4, 6) @ x.reshape(6, 4),
    "scalar arithmetic": lambda x: (2 * x - 1) / 3 + x * 0.5 - 2,
    "same-shape arithmetic": lambda x: x + x - x * x / x,
    "in-place sum": _in_place_sum,
    "split": lambda x: x.split([10, 14])[1],
    "cat": lambda x: cat([x[:3], x[5:], x]),
    "zeros_like": zeros_like,
    "orthonormalize": lambda x: orthonormalize(x.reshape(6, 4)),
    "randn_like": lambda x: randn_like(x, (5, 2), torch.Generator().manual_seed(0)),
    "to": lambda x: x.to(torch.int32),
}


@pytest.mark.parametrize("name", OPERATIONS)
def test_the_same_code_on_a_spec_gives_the_spec_of_the_tensor_result(name):
    tensor = torch.rand(24) + 1
    result = OPERATIONS[name](tensor)
    spec = OPERATIONS[name](_spec(tensor))
    assert spec == _spec(result)
    assert (spec.numel(), spec.element_size(), spec.dim()) == (result.numel(), result.element_size(), result.dim())
    assert spec.nbytes == result.nbytes


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s + TensorSpec((3,), torch.float32),
        lambda s: s.reshape(5, 5),
        lambda s: s.split([10, 10]),
        lambda s: s @ s,
        lambda s: s.T,
        lambda s: s[3],
    ],
)
def test_malformed_spec_operations_fail_like_torch_would(operation):
    with pytest.raises((ValueError, TypeError)):
        operation(TensorSpec((24,), torch.float32))


def test_all_finite_sees_nan_and_inf_in_tensors_and_nothing_in_specs():
    assert all_finite(torch.ones(3)) and all_finite(TensorSpec((3,), torch.float32))
    assert not all_finite(torch.tensor([1.0, float("nan")])) and not all_finite(torch.tensor([float("-inf")]))


def _traffic(vectors, average):
    """Bytes per RPC method of ``average(averager, name, members, vector)`` on three simulated peers."""
    sim = make_sim(latency_s=0.01)
    names = sorted(vectors)
    peers = {n: add(sim, n) for n in names}
    averagers = {n: GroupAverager(peers[n].runtime, 0, AveragingConfig(8)) for n in names}
    for averager in averagers.values():
        averager.serve()
    tasks = [peers[n].runtime.spawn(average(averagers[n], n, names, vectors[n])) for n in names]
    sim.run(until=sim.env.all_of([t.process for t in tasks]))
    return sim.traffic, [t.process.value for t in tasks]


def test_the_all_reduce_sends_the_same_bytes_in_timing_mode_as_in_numerics_mode():
    tensors = {n: torch.randn(1001, generator=torch.Generator().manual_seed(i)) for i, n in enumerate("abc")}

    def average(averager, name, members, vector):
        return averager.all_reduce("r", members, [1.0, 2.0, 3.0], vector, 2.0)

    numerics, _ = _traffic(tensors, average)
    timing, results = _traffic({n: _spec(t) for n, t in tensors.items()}, average)
    assert timing == numerics
    assert all(result == (TensorSpec((1001,), torch.float32), 3) for result in results)


def test_powersgd_sends_the_same_bytes_in_timing_mode_as_in_numerics_mode():
    shapes = [(40, 30), (30,), (8, 3)]
    count = 40 * 30 + 30 + 8 * 3
    tensors = {n: torch.randn(count, generator=torch.Generator().manual_seed(i)) for i, n in enumerate("abc")}
    states = {}

    def average(averager, name, members, vector):
        state = states.setdefault((name, isinstance(vector, TensorSpec)), PowerSGD(shapes, rank=2))
        return state.average(averager, "g", members, [1.0, 1.0, 1.0], vector, 4, seed=7)

    for _ in range(2):  # the second round also carries error feedback
        numerics, _ = _traffic(tensors, average)
        timing, results = _traffic({n: _spec(t) for n, t in tensors.items()}, average)
        assert timing == numerics
        assert all(result == (TensorSpec((count,), torch.float32), 3) for result in results)
