"""Helpers for building small model configurations in tests."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from node0sim.model import ModelConfig

MODEL_CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


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


def node0_8b(**overrides: object) -> ModelConfig:
    """The ``model=node0_8b`` configuration (conf/model/node0_8b.yaml), with ``overrides``."""
    return ModelConfig(**(OmegaConf.to_container(OmegaConf.load(MODEL_CONF / "node0_8b.yaml")) | overrides))
