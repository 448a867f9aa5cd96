"""GPU profiles for the compute cost model: time = FLOPs / (peak FLOP/s x utilization) + call overhead.

The call overhead (``sim.call_overhead_ms``, default 0.1 ms, charged once per accelerator call that
does work) stands for what does not shrink when a call carries fewer samples: kernel launches and
host-side dispatch. One CUDA kernel launch costs about 4-6 us ("pegainfer (3): From Launch Overhead
to CUDA Graph", https://susun-blog.com/blog/pegainfer-3-cuda-graph, measured on an RTX 5070 Ti), and
an eager PyTorch transformer block launches a few dozen kernels forward (norms, projections, RoPE,
attention, SwiGLU, residuals), so 0.1 ms is about one block's forward: a lower bound for a stage call.
It is what makes one batched call of n requests cheaper than n calls (stage servers batch requests).

Peaks are NVIDIA's published dense (no sparsity) 16-bit tensor-core numbers with FP32
accumulation, from each product's datasheet or architecture whitepaper:
- T4: 65 TFLOP/s FP16 (NVIDIA T4 datasheet).
- RTX 3090: 71 TFLOP/s FP16, FP32 accumulate (NVIDIA Ampere GA102 whitepaper, table for GeForce RTX 3090).
- RTX 4090: 165.2 TFLOP/s FP16, FP32 accumulate (NVIDIA Ada Lovelace architecture whitepaper).
- L4: 121 TFLOP/s BF16 (NVIDIA L4 datasheet; 242 is the sparse figure).
- A100: 312 TFLOP/s BF16 (NVIDIA A100 datasheet).
- H100 SXM: 989 TFLOP/s BF16 (NVIDIA H100 datasheet; 1979 is the sparse figure).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUProfile:
    """One accelerator model: name, peak dense 16-bit FLOP/s and memory."""

    name: str
    peak_flops: float
    memory_gb: float


GPU_PROFILES: dict[str, GPUProfile] = {
    p.name: p
    for p in (
        GPUProfile("t4", 65e12, 16),
        GPUProfile("rtx3090", 71e12, 24),
        GPUProfile("rtx4090", 165.2e12, 24),
        GPUProfile("l4", 121e12, 24),
        GPUProfile("a100", 312e12, 80),
        GPUProfile("h100", 989e12, 80),
    )
}


def gpu_profile(name: str) -> GPUProfile:
    """The profile called ``name``; a ValueError lists the known ones."""
    try:
        return GPU_PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown GPU profile {name!r}; known: {sorted(GPU_PROFILES)}") from None
