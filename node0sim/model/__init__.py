"""Llama-style model, its pipeline stages, and an analytic cost model."""

from node0sim.model.costs import (
    StageShape,
    hidden_bytes,
    stage_backward_flops,
    stage_forward_flops,
    stage_parameter_count,
    stage_shapes,
    stage_state_bytes,
)
from node0sim.model.llama import (
    Attention,
    FeedForward,
    Llama,
    ModelConfig,
    PipelineStage,
    RMSNorm,
    RotaryEmbedding,
    TransformerBlock,
    build_stages,
    stage_layer_ranges,
)

__all__ = [
    "Attention",
    "FeedForward",
    "Llama",
    "ModelConfig",
    "PipelineStage",
    "RMSNorm",
    "RotaryEmbedding",
    "StageShape",
    "TransformerBlock",
    "build_stages",
    "hidden_bytes",
    "stage_backward_flops",
    "stage_forward_flops",
    "stage_layer_ranges",
    "stage_parameter_count",
    "stage_shapes",
    "stage_state_bytes",
]
