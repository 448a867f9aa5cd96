"""GPU profiles and the two compute cost models (``sim.compute_model``).

``flat`` (the default): time = FLOPs / (peak FLOP/s x ``sim.utilization``) + call overhead, one utilization for
every operation. ``roofline``: each operation of a call (:class:`node0sim.model.costs.ComputeCost`) takes the
larger of its compute time and its memory time (:func:`node0sim.model.costs.roofline_seconds`): a matrix product
at an efficiency that grows with its size (:class:`MatmulCurve`), the optimizer step as memory traffic; plus the
call overhead. ``sim.compute_dtype`` picks the peak: 16-bit tensor cores (``bfloat16``), TF32 tensor cores
(``tf32``) or plain FP32 (``float32``: PyTorch's default for fp32 tensors, ``allow_tf32`` off, which is how
Node0 trains).

The call overhead (``sim.call_overhead_ms``, default 0.1 ms, charged once per accelerator call that
does work) stands for what does not shrink when a call carries fewer samples: kernel launches and
host-side dispatch. One CUDA kernel launch costs about 4-6 us ("pegainfer (3): From Launch Overhead
to CUDA Graph", https://susun-blog.com/blog/pegainfer-3-cuda-graph, measured on an RTX 5070 Ti), and
an eager PyTorch transformer block launches a few dozen kernels forward (norms, projections, RoPE,
attention, SwiGLU, residuals), so 0.1 ms is about one block's forward: a lower bound for a stage call.
It is what makes one batched call of n requests cheaper than n calls (stage servers batch requests).

Datasheet figures, dense (no sparsity; NVIDIA prints the sparse figure, twice these, with an asterisk):
16-bit tensor peak with FP32 accumulation, TF32 tensor peak, FP32 (non-tensor) peak, memory, memory bandwidth.
- T4: 65 FP16, no TF32 (Turing: fp32 runs at the FP32 peak), 8.1 FP32 TFLOP/s; 16 GB, 320 GB/s (NVIDIA T4 datasheet).
- RTX 3090: 71, 35.6, 35.6 TFLOP/s; 24 GB, 936 GB/s (NVIDIA Ampere GA102 GPU architecture whitepaper, RTX 3090 column).
- RTX 4090: 165.2, 82.6, 82.6 TFLOP/s; 24 GB, 1008 GB/s (NVIDIA Ada Lovelace GPU architecture whitepaper, RTX 4090 column).
- L4: 121, 60, 30.3 TFLOP/s; 24 GB, 300 GB/s (NVIDIA L4 datasheet: 242 / 120 with sparsity).
- A100 80GB SXM: 312, 156, 19.5 TFLOP/s; 80 GB, 2039 GB/s (NVIDIA A100 datasheet).
- H100 SXM: 989, 494.5, 67 TFLOP/s; 80 GB, 3.35 TB/s (NVIDIA H100 datasheet: 1979 / 989 with sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from node0sim.model.costs import ComputeCost, roofline_seconds

COMPUTE_DTYPES = ("bfloat16", "tf32", "float32")
ELEMENT_BYTES = {"bfloat16": 2, "tf32": 4, "float32": 4}
"""Bytes per matrix element the roofline's memory term moves (and activations take) for each compute dtype."""


@dataclass(frozen=True)
class MatmulCurve:
    """Achieved efficiency of one matrix product of F FLOPs: ``t(F) = fixed_s + F / (max_efficiency x peak)``.

    A fixed time per product (ramp-up and tail of the kernel, independent of size) plus a throughput term, so
    ``efficiency(F) = max_efficiency x F / (F + max_efficiency x peak x fixed_s)``: small products are slow,
    large ones approach ``max_efficiency`` (the largest achieved fraction of the datasheet peak).
    """

    max_efficiency: float
    fixed_s: float

    def efficiency(self, flops: float, peak_flops: float) -> float:
        """Fraction of ``peak_flops`` a product of ``flops`` FLOPs achieves."""
        return self.max_efficiency * flops / (flops + self.max_efficiency * peak_flops * self.fixed_s)


MATMUL_CURVES = {
    "bfloat16": MatmulCurve(max_efficiency=0.743, fixed_s=6.49e-6),
    "tf32": MatmulCurve(max_efficiency=0.591, fixed_s=8.83e-6),
}
"""Fitted by ``tools/bench_compute.py --table tools/data/h100_matmul_xla.csv --gpu h100`` to NVIDIA H100 matmul
throughput measured by the OpenXLA authors (31 shapes from 0.07 to 137 GFLOP, 11 to 783 TFLOP/s in bf16). Curve vs
measurement: rms error 14% in bf16; 25% in TF32, where the curve underestimates the largest shapes (0.58 vs 0.81).
Cross-check: Bekman's "Maximum Achievable Matmul FLOPS" table (stas00/ml-engineering, compute/accelerator/README.md)
finds 794.5 of 989 TFLOP/s (80.3%) on an H100 SXM and 271.2 of 312 (86.9%) on an A100 SXM at their best shapes.
No such measurement of the other profiles was found, so every profile uses H100's curve: the same fixed time per
product and the same asymptotic fraction of its own peak (``tools/bench_compute.py --gpu NAME`` on that GPU measures
its own). ``float32`` (no tensor cores) uses the TF32 curve, also unmeasured."""


@dataclass(frozen=True)
class GPUProfile:
    """One accelerator model: datasheet peaks (dense FLOP/s), memory (GB) and memory bandwidth (bytes/s)."""

    name: str
    peak_flops: float
    """16-bit tensor-core peak (FP32 accumulation): the flat model's peak for ``bfloat16``."""
    memory_gb: float
    peak_tf32_flops: float
    peak_fp32_flops: float
    memory_bandwidth: float

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for matrix products in ``dtype`` (one of ``COMPUTE_DTYPES``)."""
        return {"bfloat16": self.peak_flops, "tf32": self.peak_tf32_flops, "float32": self.peak_fp32_flops}[dtype]


GPU_PROFILES: dict[str, GPUProfile] = {
    p.name: p
    for p in (
        GPUProfile("t4", 65e12, 16, 8.1e12, 8.1e12, 320e9),
        GPUProfile("rtx3090", 71e12, 24, 35.6e12, 35.6e12, 936e9),
        GPUProfile("rtx4090", 165.2e12, 24, 82.6e12, 82.6e12, 1008e9),
        GPUProfile("l4", 121e12, 24, 60e12, 30.3e12, 300e9),
        GPUProfile("a100", 312e12, 80, 156e12, 19.5e12, 2039e9),
        GPUProfile("h100", 989e12, 80, 494.5e12, 67e12, 3.35e12),
    )
}


def gpu_profile(name: str) -> GPUProfile:
    """The profile called ``name``; a ValueError lists the known ones."""
    try:
        return GPU_PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown GPU profile {name!r}; known: {sorted(GPU_PROFILES)}") from None


class ComputeModel(Protocol):
    """Turns the work of one accelerator call into seconds (the call overhead is the engine's)."""

    flops_per_s: float
    """The rate a peer announces for routing and balancing: what large products achieve."""

    def seconds(self, cost: ComputeCost) -> float: ...


@dataclass(frozen=True)
class FlatCompute:
    """``sim.compute_model=flat``: every FLOP at ``peak x utilization``."""

    flops_per_s: float

    def seconds(self, cost: ComputeCost) -> float:
        return cost.flops / self.flops_per_s


@dataclass(frozen=True)
class RooflineCompute:
    """``sim.compute_model=roofline``: each product on the roofline at its size's efficiency, elementwise work
    (the optimizer step) at the FP32 peak or the memory bandwidth, whichever is slower."""

    gpu: GPUProfile
    dtype: str

    @property
    def flops_per_s(self) -> float:
        return self.gpu.peak(self.dtype) * MATMUL_CURVES[_curve_dtype(self.dtype)].max_efficiency

    def seconds(self, cost: ComputeCost) -> float:
        peak, bandwidth = self.gpu.peak(self.dtype), self.gpu.memory_bandwidth
        curve, element_bytes = MATMUL_CURVES[_curve_dtype(self.dtype)], ELEMENT_BYTES[self.dtype]
        matmuls = sum(
            roofline_seconds(mm.flops, mm.bytes_moved(element_bytes), peak * curve.efficiency(mm.flops, peak), bandwidth)
            for mm in cost.matmuls
        )
        if not (cost.elementwise_flops or cost.elementwise_bytes):
            return matmuls
        return matmuls + roofline_seconds(cost.elementwise_flops, cost.elementwise_bytes, self.gpu.peak_fp32_flops, bandwidth)


def _curve_dtype(dtype: str) -> str:
    return "bfloat16" if dtype == "bfloat16" else "tf32"


def compute_model(name: str, gpu: GPUProfile, dtype: str, utilization: float) -> ComputeModel:
    """The ``sim.compute_model`` called ``name`` for one peer's GPU."""
    if name == "flat":
        return FlatCompute(gpu.peak(dtype) * utilization)
    if name == "roofline":
        return RooflineCompute(gpu, dtype)
    raise ValueError(f"sim.compute_model: {name!r} is not one of ['flat', 'roofline']")
