"""Analytic parameter, FLOP and memory costs of pipeline stages (no tensors allocated).

FLOP convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models"): a
multiply-add is 2 FLOPs, so a forward pass costs about 2N FLOPs per token for N
parameters and a training step (forward + backward) about 6N, the backward pass
being twice the forward. Elementwise work (norms, RoPE, softmax, SiLU, residual adds)
and the embedding lookup are not counted.
"""

from __future__ import annotations

import math

from node0sim.model.llama import ModelConfig, block_linear_shapes, embedding_shape, stage_layer_ranges, stage_weight_shapes

__all__ = [
    "StageShape",
    "stage_shapes",
    "stage_parameter_count",
    "stage_forward_flops",
    "stage_backward_flops",
    "hidden_bytes",
    "stage_state_bytes",
]

StageShape = tuple[range, bool, bool]
"""``(layer_range, is_head, is_tail)`` of one stage."""


def stage_shapes(cfg: ModelConfig, num_stages: int) -> list[StageShape]:
    """Per stage ``(layer_range, is_head, is_tail)``, matching :func:`build_stages`."""
    ranges = stage_layer_ranges(cfg.n_layers, num_stages)
    return [(r, i == 0, i == num_stages - 1) for i, r in enumerate(ranges)]


def _layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block's linear layers (q, k, v, o projections and SwiGLU w1, w2, w3)."""
    return sum(math.prod(shape) for shape in block_linear_shapes(cfg).values())


def stage_parameter_shapes(cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool) -> list[tuple[int, ...]]:
    """Shapes of a stage's trainable parameters (what gradient compression works on), in the module's order."""
    return list(stage_weight_shapes(cfg, layer_range, is_head, is_tail).values())


def stage_parameter_count(cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool) -> int:
    """Number of parameters held by a stage (embedding on the head, final norm and LM head on the tail)."""
    return sum(math.prod(shape) for shape in stage_parameter_shapes(cfg, layer_range, is_head, is_tail))


def stage_forward_flops(
    cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool, batch: int, seq_len: int
) -> float:
    """Forward FLOPs of a stage for ``batch`` sequences of ``seq_len`` tokens."""
    tokens = batch * seq_len
    per_layer = 2.0 * tokens * _layer_matmul_params(cfg)
    # Scores q.k^T and the weighted sum over values: 2 matmuls of 2 * T^2 * dim FLOPs per sequence.
    # The full T^2 is counted although the causal mask makes half of it unnecessary.
    per_layer += 2.0 * 2.0 * batch * seq_len * seq_len * cfg.dim
    flops = len(layer_range) * per_layer
    if is_tail:
        vocab_size, dim = embedding_shape(cfg)  # the LM head's weight
        flops += 2.0 * tokens * dim * vocab_size
    return flops


def stage_backward_flops(
    cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool, batch: int, seq_len: int
) -> float:
    """Backward FLOPs of a stage: twice the forward (gradients w.r.t. inputs and weights)."""
    return 2.0 * stage_forward_flops(cfg, layer_range, is_head, is_tail, batch, seq_len)


def hidden_bytes(cfg: ModelConfig, batch: int, seq_len: int, bytes_per_element: int) -> int:
    """Size of the hidden activation [batch, seq_len, dim] sent between stages (and of its gradient)."""
    return batch * seq_len * cfg.dim * bytes_per_element


def stage_state_bytes(
    cfg: ModelConfig,
    layer_range: range,
    is_head: bool,
    is_tail: bool,
    bytes_per_param: int = 4,
    optimizer_slots: int = 2,
) -> int:
    """Bytes of a stage's parameters plus ``optimizer_slots`` same-size optimizer states (Adam: 2 moments)."""
    return stage_parameter_count(cfg, layer_range, is_head, is_tail) * bytes_per_param * (1 + optimizer_slots)
