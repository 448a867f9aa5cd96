"""Analytic parameter, FLOP and memory costs of pipeline stages (no tensors allocated).

FLOP convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models"): a
multiply-add is 2 FLOPs, so a forward pass costs about 2N FLOPs per token for N
parameters and a training step (forward + backward) about 6N, the backward pass
being twice the forward. Elementwise work (norms, RoPE, softmax, SiLU, residual adds)
and the embedding lookup are not counted.

For the roofline compute model (``sim.compute_model=roofline``) the same work is also listed
operation by operation: the matrix products of a stage (:class:`Matmul`, their FLOPs sum to
:func:`stage_forward_flops`) and the optimizer step as memory traffic, in a :class:`ComputeCost`;
:func:`roofline_seconds` is the time of one operation and :func:`stage_memory` the memory a
stage server needs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from node0sim.model.llama import ModelConfig, block_linear_shapes, embedding_shape, stage_layer_ranges, stage_weight_shapes

__all__ = [
    "StageShape",
    "stage_shapes",
    "stage_parameter_count",
    "stage_forward_flops",
    "stage_backward_flops",
    "hidden_bytes",
    "stage_state_bytes",
    "Matmul",
    "ComputeCost",
    "stage_forward_matmuls",
    "stage_forward_cost",
    "stage_training_cost",
    "optimizer_step_cost",
    "roofline_seconds",
    "StageMemory",
    "stage_memory",
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


# ---- operation by operation: the roofline model's input ------------------------------------------
@dataclass(frozen=True)
class Matmul:
    """``batch`` products of an [m, k] by a [k, n] matrix (one batched GEMM call).

    ``shared``: the operand that is one matrix for the whole batch, read or written once: ``"rhs"`` (a weight),
    ``"out"`` (a weight gradient, summed over the batch) or ``""`` (none: both inputs are activations).
    """

    batch: int
    m: int
    k: int
    n: int
    shared: str = ""

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n

    def bytes_moved(self, element_bytes: int) -> float:
        """Bytes read and written once each: both inputs and the output (the shared one counted once)."""
        sizes = {"lhs": self.m * self.k, "rhs": self.k * self.n, "out": self.m * self.n}
        return element_bytes * sum(size * (1 if name == self.shared else self.batch) for name, size in sizes.items())

    def gradients(self) -> tuple[Matmul, Matmul]:
        """The backward pass's two products for ``Y = A B``: ``dA = dY B^T`` and ``dB = A^T dY`` (same FLOPs each).

        With a shared weight B, ``dA`` reads it once and ``dB`` is summed over the batch into one matrix.
        """
        weight = self.shared == "rhs"
        return (
            Matmul(self.batch, self.m, self.n, self.k, "rhs" if weight else ""),
            Matmul(self.batch, self.k, self.m, self.n, "out" if weight else ""),
        )


@dataclass(frozen=True)
class ComputeCost:
    """The work of one accelerator call: its matrix products and its elementwise work (FLOPs and memory traffic)."""

    matmuls: tuple[Matmul, ...] = ()
    elementwise_flops: float = 0.0
    elementwise_bytes: float = 0.0

    @functools.cached_property
    def flops(self) -> float:
        """All FLOPs of the call (what the flat model charges)."""
        return sum(mm.flops for mm in self.matmuls) + self.elementwise_flops

    @staticmethod
    def merge(costs: list[ComputeCost]) -> ComputeCost:
        """One batched call of ``costs``: calls with the same products (differing only in batch, as requests of one
        kind on one stage do) merge into larger products; any others are listed one after the other."""
        first = costs[0]
        same = all(
            len(c.matmuls) == len(first.matmuls)
            and all(replace(a, batch=1) == replace(b, batch=1) for a, b in zip(c.matmuls, first.matmuls))
            for c in costs
        )
        if same:
            matmuls = tuple(replace(mm, batch=sum(c.matmuls[i].batch for c in costs)) for i, mm in enumerate(first.matmuls))
        else:
            matmuls = tuple(mm for c in costs for mm in c.matmuls)
        return ComputeCost(
            matmuls, sum(c.elementwise_flops for c in costs), sum(c.elementwise_bytes for c in costs)
        )


def stage_forward_matmuls(
    cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool, batch: int, seq_len: int
) -> list[Matmul]:
    """The matrix products of a stage's forward pass over ``batch`` sequences (FLOPs: :func:`stage_forward_flops`).

    Per layer: the seven projections (each [seq_len, in] x a shared [in, out] weight, batched over sequences) and
    attention's scores q k^T and weighted sum over values, batched over sequences x query heads; on the tail, the
    LM head. The embedding lookup is not a product.
    """
    head_dim = cfg.head_dim
    layer = [Matmul(batch, seq_len, d_in, d_out, "rhs") for d_out, d_in in block_linear_shapes(cfg).values()]
    layer += [
        Matmul(batch * cfg.n_heads, seq_len, head_dim, seq_len),  # scores: q [T, hd] x k^T [hd, T]
        Matmul(batch * cfg.n_heads, seq_len, seq_len, head_dim),  # probabilities [T, T] x v [T, hd]
    ]
    matmuls = layer * len(layer_range)
    if is_tail:
        vocab_size, dim = embedding_shape(cfg)
        matmuls.append(Matmul(batch, seq_len, dim, vocab_size, "rhs"))
    return matmuls


@functools.lru_cache(maxsize=256)  # one per stage shape and micro-batch shape: every request of a run reuses it
def stage_forward_cost(cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool, batch: int, seq_len: int) -> ComputeCost:
    """One forward pass of a stage."""
    return ComputeCost(tuple(stage_forward_matmuls(cfg, layer_range, is_head, is_tail, batch, seq_len)))


@functools.lru_cache(maxsize=256)
def stage_training_cost(cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool, batch: int, seq_len: int) -> ComputeCost:
    """A recomputed forward pass plus the backward pass (the gradients of every product), as a backward request
    costs: 3x the forward's FLOPs."""
    forward = stage_forward_matmuls(cfg, layer_range, is_head, is_tail, batch, seq_len)
    return ComputeCost(tuple(forward + [grad for mm in forward for grad in mm.gradients()]))


def optimizer_step_cost(num_params: int, state_tensors: int, flops_per_param: float, bytes_per_value: int = 4) -> ComputeCost:
    """One optimizer step over ``num_params`` fp32 parameters with ``state_tensors`` state tensors each (AdamW: 2).

    An elementwise update: it reads every parameter, its gradient and its states and writes the parameter and the
    states back, ``(3 + 2 x state_tensors)`` values per parameter (AdamW: 7 x 4 bytes; PyTorch's AdamW, Loshchilov &
    Hutter 2019, Algorithm 2), for ``flops_per_param`` FLOPs each.
    """
    return ComputeCost(
        elementwise_flops=flops_per_param * num_params,
        elementwise_bytes=float((3 + 2 * state_tensors) * bytes_per_value * num_params),
    )


def roofline_seconds(flops: float, bytes_moved: float, achieved_flops_per_s: float, memory_bytes_per_s: float) -> float:
    """Time of one operation on the roofline (Williams et al. 2009, "Roofline: an insightful visual performance model"):
    the larger of its compute time and its memory time."""
    return max(flops / achieved_flops_per_s, bytes_moved / memory_bytes_per_s)


# ---- memory a stage server needs ------------------------------------------------------------------
ACTIVATION_BYTES_PER_TOKEN_DIM = 34
"""Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4.1, equation 1:
a transformer layer keeps ``s b h (34 + 5 a s / h)`` bytes of 16-bit activations for its backward pass (sequence s,
batch b, width h, a heads; a GPT block: 4h GELU MLP, 1-byte dropout masks). The ``5 a s / h`` term is the stored
attention scores, which a fused attention kernel does not keep (FlashAttention, Dao et al. 2022; the model calls
``scaled_dot_product_attention``), so it is left out. A SwiGLU MLP as wide as Llama's stores more than GPT's."""


@dataclass(frozen=True)
class StageMemory:
    """Bytes one stage server holds at its peak, by what holds them."""

    weights: float
    gradients: float
    optimizer_state: float
    activations: float
    """Stored for the backward pass of one accelerator call (up to ``requests_per_call`` micro-batches)."""
    queued_requests: float
    """Activations and gradients of the requests that can wait at the stage at once, as they arrived (encoded)."""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.queued_requests


def stage_memory(
    cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool, *, micro_batch: int, seq_len: int,
    element_bytes: int, requests_per_call: int, queued_bytes: float, state_tensors: int,
) -> StageMemory:
    """Peak memory of a stage server: fp32 weights, gradient accumulator and optimizer states, the activations of one
    call (:data:`ACTIVATION_BYTES_PER_TOKEN_DIM`, scaled from 16-bit to ``element_bytes``, plus the tail's logits and
    their gradient), and ``queued_bytes`` of requests waiting for the accelerator (as they arrived, encoded)."""
    params = stage_parameter_count(cfg, layer_range, is_head, is_tail)
    tokens = micro_batch * requests_per_call * seq_len
    activations = len(layer_range) * tokens * cfg.dim * ACTIVATION_BYTES_PER_TOKEN_DIM * element_bytes / 2
    if is_tail:
        activations += 2 * tokens * embedding_shape(cfg)[0] * element_bytes
    return StageMemory(
        weights=4.0 * params, gradients=4.0 * params, optimizer_state=4.0 * params * state_tensors, activations=activations,
        queued_requests=queued_bytes,
    )
