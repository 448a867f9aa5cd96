"""Llama-style decoder and its pipeline-stage slices.

The architecture follows Meta's Llama (RMSNorm, RoPE, grouped-query attention, SwiGLU
feed-forward) with the two switches of Node0's model config: ``qk_norm`` (RMSNorm of
queries and keys per head) and ``norm_reorder`` (the sublayer norm applied to the
sublayer's output instead of its input).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "Attention",
    "FeedForward",
    "TransformerBlock",
    "Llama",
    "PipelineStage",
    "stage_layer_ranges",
    "build_stages",
    "embedding_shape",
    "block_linear_shapes",
    "stage_weight_shapes",
]

INIT_STD = 0.02


@dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture switches of a Llama-style model."""

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim_multiplier: float | None
    multiple_of: int
    rope_theta: float
    max_seq_len: int
    qk_norm: bool
    norm_reorder: bool
    trainable_rmsnorm: bool
    norm_eps: float = 1e-5
    embedding_init_std: float = INIT_STD  # std of the trainable token embedding at init (Node0: 1.0, models/llama/layers.py)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{field}={getattr(self, field)!r} is invalid: {why}")

        if not isinstance(self.name, str) or not self.name:
            raise bad("name", "must be a non-empty string")
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(field, "must be an int")
            if value <= 0:
                raise bad(field, "must be positive")
        for field in ("rope_theta", "norm_eps", "embedding_init_std"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise bad(field, "must be a positive number")
        mult = self.ffn_dim_multiplier
        if mult is not None and (isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0):
            raise bad("ffn_dim_multiplier", "must be None or a positive number")
        for field in ("qk_norm", "norm_reorder", "trainable_rmsnorm"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "must be a bool")
        if self.dim % self.n_heads != 0:
            raise bad("n_heads", f"dim ({self.dim}) must be divisible by n_heads")
        if self.n_heads % self.n_kv_heads != 0:
            raise bad("n_kv_heads", f"n_heads ({self.n_heads}) must be divisible by n_kv_heads")
        if self.head_dim % 2 != 0:
            raise bad("n_heads", f"head_dim = dim // n_heads = {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width, computed as in Meta's Llama reference ``FeedForward``."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def embedding_shape(cfg: ModelConfig) -> tuple[int, int]:
    """Shape ``(vocab_size, dim)`` of the token embedding and of the LM head's weight."""
    return (cfg.vocab_size, cfg.dim)


def block_linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Weight shape ``(out_features, in_features)`` of each linear layer of a :class:`TransformerBlock`, by module name.

    The blocks are built from this table, so it is the one definition of their weight shapes.
    """
    q_dim, kv_dim, hidden = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_hidden_dim
    return {
        "attention.wq": (q_dim, cfg.dim),
        "attention.wk": (kv_dim, cfg.dim),
        "attention.wv": (kv_dim, cfg.dim),
        "attention.wo": (cfg.dim, q_dim),
        "feed_forward.w1": (hidden, cfg.dim),
        "feed_forward.w2": (cfg.dim, hidden),
        "feed_forward.w3": (hidden, cfg.dim),
    }


def stage_weight_shapes(cfg: ModelConfig, layer_range: range, is_head: bool, is_tail: bool) -> dict[str, tuple[int, ...]]:
    """Name and shape of every trainable parameter of a stage, as ``PipelineStage.named_parameters()`` yields them.

    Computed from ``cfg`` alone (no tensors), so it works for models too large to build.
    """
    linears = block_linear_shapes(cfg)
    block: dict[str, tuple[int, ...]] = {f"{name}.weight": linears[name] for name in linears if name.startswith("attention.")}
    if cfg.trainable_rmsnorm and cfg.qk_norm:
        block |= {"attention.q_norm.weight": (cfg.head_dim,), "attention.k_norm.weight": (cfg.head_dim,)}
    block |= {f"{name}.weight": linears[name] for name in linears if name.startswith("feed_forward.")}
    if cfg.trainable_rmsnorm:
        block |= {"attention_norm.weight": (cfg.dim,), "ffn_norm.weight": (cfg.dim,)}
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": embedding_shape(cfg)} if is_head else {}
    for layer in layer_range:
        shapes |= {f"layers.{layer}.{name}": shape for name, shape in block.items()}
    if is_tail:
        shapes |= ({"norm.weight": (cfg.dim,)} if cfg.trainable_rmsnorm else {}) | {"output.weight": embedding_shape(cfg)}
    return shapes


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension; gain-free when ``trainable`` is False."""

    def __init__(self, dim: int, eps: float, trainable: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if trainable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return out if self.weight is None else out * self.weight


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, "RoFormer"), pairs of adjacent channels rotated.

    The cos/sin tables for ``max_seq_len`` positions are non-persistent buffers.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape [B, T, H, head_dim] by the angles of positions 0..T-1."""
        seq_len = x.shape[1]
        cos = self.cos[:seq_len].view(1, seq_len, 1, -1)
        sin = self.sin[:seq_len].view(1, seq_len, 1, -1)
        pairs = x.float().unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return rotated.flatten(-2).type_as(x)


def _linear(shape: tuple[int, int]) -> nn.Linear:
    """A bias-free linear layer whose weight has ``shape`` = (out_features, in_features)."""
    # skip_init: parameters are filled later by Llama from its own generator, so building
    # a model never consumes the global RNG.
    out_features, in_features = shape
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query K/V heads and optional qk-norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        shapes = block_linear_shapes(cfg)
        self.wq = _linear(shapes["attention.wq"])
        self.wk = _linear(shapes["attention.wk"])
        self.wv = _linear(shapes["attention.wv"])
        self.wo = _linear(shapes["attention.wo"])
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.trainable_rmsnorm)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.trainable_rmsnorm)
        else:
            self.q_norm = None
            self.k_norm = None

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = rope(q), rope(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020, "GLU Variants")."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        shapes = block_linear_shapes(cfg)
        self.w1 = _linear(shapes["feed_forward.w1"])
        self.w2 = _linear(shapes["feed_forward.w2"])
        self.w3 = _linear(shapes["feed_forward.w3"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Attention + feed-forward with residuals; pre-norm, or post-sublayer norm if ``norm_reorder``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_reorder = cfg.norm_reorder
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.trainable_rmsnorm)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.trainable_rmsnorm)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        if self.norm_reorder:
            h = x + self.attention_norm(self.attention(x, rope))
            return h + self.ffn_norm(self.feed_forward(h))
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


def _check_token_ids(x: torch.Tensor, cfg: ModelConfig, where: str) -> None:
    if x.dtype != torch.long:
        raise ValueError(f"{where} expected token ids of dtype torch.int64, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{where} expected token ids of shape [B, T] with B, T >= 1, got {tuple(x.shape)}")
    if x.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{where} got sequence length {x.shape[1]} > max_seq_len {cfg.max_seq_len}")
    lo, hi = torch.aminmax(x)
    if lo.item() < 0 or hi.item() >= cfg.vocab_size:
        raise ValueError(
            f"{where} got token ids out of range [0, {cfg.vocab_size}): min {lo.item()}, max {hi.item()}"
        )


def _check_fixed_embedding(fixed_embedding: torch.Tensor, cfg: ModelConfig) -> None:
    expected = (cfg.vocab_size, cfg.dim)
    if not isinstance(fixed_embedding, torch.Tensor) or tuple(fixed_embedding.shape) != expected:
        got = tuple(fixed_embedding.shape) if isinstance(fixed_embedding, torch.Tensor) else type(fixed_embedding)
        raise ValueError(f"fixed_embedding must have shape (vocab_size, dim) = {expected}, got {got}")
    if not fixed_embedding.is_floating_point():
        raise ValueError(f"fixed_embedding must be a floating-point tensor, got dtype {fixed_embedding.dtype}")


def _embed(tok_embeddings: nn.Embedding, fixed_embedding: torch.Tensor | None, token_ids: torch.Tensor) -> torch.Tensor:
    h = tok_embeddings(token_ids)
    return h if fixed_embedding is None else h + fixed_embedding[token_ids]


class Llama(nn.Module):
    """Full Llama-style decoder; parameters are a deterministic function of ``seed``.

    ``fixed_embedding`` (vocab_size x dim), if given, is a frozen table added to the trainable
    token embedding (Protocol Models' ``T_fixed``). It is a persistent buffer, not a parameter;
    without it the module's parameters and state-dict keys are those of the plain model.
    """

    def __init__(self, cfg: ModelConfig, seed: int, fixed_embedding: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.utils.skip_init(nn.Embedding, *embedding_shape(cfg))
        if fixed_embedding is not None:
            _check_fixed_embedding(fixed_embedding, cfg)
            fixed_embedding = fixed_embedding.detach().to(self.tok_embeddings.weight.dtype).clone()
        # A None buffer is absent from state_dict(), so the plain model's keys are unchanged.
        self.register_buffer("fixed_embedding", fixed_embedding, persistent=True)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.trainable_rmsnorm)
        self.output = _linear(embedding_shape(cfg))
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        # N(0, 0.02) for linears and (by default, model.embedding_init_std) the token embedding; residual output
        # projections (wo, w2) scaled by 1/sqrt(2 * n_layers) as in GPT-2 (Radford et al. 2019). RMSNorm gains stay at 1.
        gen = torch.Generator(device="cpu").manual_seed(seed)
        residual_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if name == "tok_embeddings.weight":
                std = self.cfg.embedding_init_std
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                std = residual_std
            else:
                std = INIT_STD
            param.copy_(torch.empty(param.shape, dtype=param.dtype).normal_(0.0, std, generator=gen))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Map token ids [B, T] to logits [B, T, vocab_size]."""
        _check_token_ids(token_ids, self.cfg, "Llama")
        h = _embed(self.tok_embeddings, self.fixed_embedding, token_ids)
        for layer in self.layers:
            h = layer(h, self.rope)
        return self.output(self.norm(h))


def stage_layer_ranges(n_layers: int, num_stages: int) -> list[range]:
    """Split ``n_layers`` contiguously over ``num_stages``; earlier stages take the extra layers."""
    if num_stages < 1 or num_stages > n_layers:
        raise ValueError(f"num_stages={num_stages} must be between 1 and n_layers={n_layers}")
    base, extra = divmod(n_layers, num_stages)
    ranges = []
    start = 0
    for index in range(num_stages):
        stop = start + base + (1 if index < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


class PipelineStage(nn.Module):
    """One pipeline stage: deep copies of the embedding (head), a run of layers, and norm + LM head (tail).

    The head also copies the model's frozen ``fixed_embedding`` buffer, if it has one.

    Layers are kept in a ``ModuleDict`` keyed by their global index, so ``named_parameters()``
    yields the same names as the corresponding parameters of the full :class:`Llama`.
    """

    def __init__(self, model: Llama, index: int, num_stages: int) -> None:
        super().__init__()
        cfg = model.cfg
        if not 0 <= index < num_stages:
            raise ValueError(f"stage index {index} must be in [0, {num_stages})")
        self.cfg = cfg
        self.index = index
        self.num_stages = num_stages
        self.is_head = index == 0
        self.is_tail = index == num_stages - 1
        self.layer_range = stage_layer_ranges(cfg.n_layers, num_stages)[index]
        self.tok_embeddings = copy.deepcopy(model.tok_embeddings) if self.is_head else None
        has_fixed = self.is_head and model.fixed_embedding is not None
        self.register_buffer("fixed_embedding", model.fixed_embedding.clone() if has_fixed else None, persistent=True)
        self.rope = copy.deepcopy(model.rope)
        self.layers = nn.ModuleDict({str(i): copy.deepcopy(model.layers[i]) for i in self.layer_range})
        self.norm = copy.deepcopy(model.norm) if self.is_tail else None
        self.output = copy.deepcopy(model.output) if self.is_tail else None

    def _check_hidden(self, x: torch.Tensor) -> None:
        dtype = next(iter(self.layers.values())).attention.wq.weight.dtype
        if x.dim() != 3 or x.shape[2] != self.cfg.dim or x.shape[0] < 1 or x.shape[1] < 1 or x.dtype != dtype:
            expected = f"[B, T, {self.cfg.dim}] {str(dtype).removeprefix('torch.')}"
            got = f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
            raise ValueError(f"stage {self.index} expected hidden of shape {expected}, got {got}")
        if x.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"stage {self.index} got sequence length {x.shape[1]} > max_seq_len {self.cfg.max_seq_len}"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"stage {self.index} got non-finite (NaN/inf) hidden values")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (head) or hidden [B, T, dim] -> hidden [B, T, dim], or logits [B, T, V] on the tail."""
        if self.is_head:
            _check_token_ids(x, self.cfg, f"stage {self.index}")
            h = _embed(self.tok_embeddings, self.fixed_embedding, x)
        else:
            self._check_hidden(x)
            h = x
        for layer in self.layers.values():
            h = layer(h, self.rope)
        if self.is_tail:
            return self.output(self.norm(h))
        return h

    def _check_loss_inputs(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if not self.is_tail:
            raise RuntimeError(f"stage {self.index} of {self.num_stages} is not the tail; it has no loss")
        if logits.dim() != 3 or targets.shape != logits.shape[:2]:
            raise ValueError(
                f"stage {self.index} expected logits [B, T, V] and targets [B, T], "
                f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token-level cross entropy of tail logits [B, T, V] against targets [B, T]."""
        self._check_loss_inputs(logits, targets)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross entropy of each token [B, T] (what Node0's tail expert returns from its forward, ``layers.py``)."""
        self._check_loss_inputs(logits, targets)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def build_stages(
    cfg: ModelConfig, num_stages: int, seed: int, fixed_embedding: torch.Tensor | None = None
) -> list[PipelineStage]:
    """Build ``Llama(cfg, seed, fixed_embedding)`` once and slice it into ``num_stages`` stages sharing no parameters."""
    stage_layer_ranges(cfg.n_layers, num_stages)  # validates num_stages before building the model
    model = Llama(cfg, seed, fixed_embedding)
    return [PipelineStage(model, index, num_stages) for index in range(num_stages)]
