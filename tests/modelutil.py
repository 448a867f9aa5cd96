"""Helpers for building small model configurations in tests."""

from __future__ import annotations

from node0sim.model import ModelConfig


def small_config(**overrides: object) -> ModelConfig:
    """A 4-layer, 4-head (2 KV heads) ModelConfig of width 32; ``overrides`` replace any of its fields."""
    fields: dict[str, object] = dict(
        name="tiny",
        vocab_size=64,
        dim=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim_multiplier=None,
        multiple_of=16,
        rope_theta=10000.0,
        max_seq_len=16,
        qk_norm=False,
        norm_reorder=False,
        trainable_rmsnorm=True,
    )
    return ModelConfig(**(fields | overrides))
