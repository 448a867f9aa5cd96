"""What a stage server computes: real tensors (numerics mode) or only sizes and FLOPs (timing mode).

Both implementations expose the same operations and FLOP costs, so the stage server and the
network see identical traffic and compute time in either mode.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from node0sim.model import ModelConfig, PipelineStage
from node0sim.model.costs import stage_backward_flops, stage_forward_flops, stage_parameter_count
from node0sim.protocol.messages import Payload, TensorSpec, leading_dims

OPTIMIZER_FLOPS_PER_PARAM = 12
"""AdamW step cost: a dozen elementwise operations per parameter."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then linear decay (Node0's schedule) and gradient clipping."""

    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 0
    clip_grad_norm: float = 1.0

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based); ``total_steps`` 0 means constant after warmup."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps:
            span = max(1, self.total_steps - self.warmup_steps)
            return max(0.0, 1.0 - (step - self.warmup_steps) / span)
        return 1.0


class StageCompute(ABC):
    """Forward, backward (with recomputation), tail and optimizer step of one pipeline stage."""

    def __init__(self, cfg: ModelConfig, index: int, num_stages: int, layer_range: range):
        self.cfg = cfg
        self.index = index
        self.num_stages = num_stages
        self.layer_range = layer_range
        self.is_head = index == 0
        self.is_tail = index == num_stages - 1
        self.num_params = stage_parameter_count(cfg, layer_range, self.is_head, self.is_tail)
        self.updates = 0

    def forward_flops(self, inputs: Payload) -> float:
        """FLOPs of one forward pass on ``inputs``."""
        batch, seq_len = leading_dims(inputs)
        return stage_forward_flops(self.cfg, self.layer_range, self.is_head, self.is_tail, batch, seq_len)

    def backward_flops(self, inputs: Payload) -> float:
        """FLOPs of recomputing the forward pass plus the backward pass."""
        batch, seq_len = leading_dims(inputs)
        backward = stage_backward_flops(self.cfg, self.layer_range, self.is_head, self.is_tail, batch, seq_len)
        return self.forward_flops(inputs) + backward

    def step_flops(self) -> float:
        """FLOPs of one optimizer step."""
        return OPTIMIZER_FLOPS_PER_PARAM * self.num_params

    @abstractmethod
    def forward(self, inputs: Payload) -> Payload:
        """The stage's output for ``inputs`` (no state is kept)."""

    @abstractmethod
    def backward(self, inputs: Payload, grad_outputs: Payload) -> Payload | None:
        """Recompute the forward pass, accumulate parameter gradients, return the input gradient."""

    @abstractmethod
    def tail(self, inputs: Payload, targets: Payload) -> tuple[float | None, Payload | None]:
        """Forward, loss and backward on the last stage: ``(mean loss, input gradient)``."""

    @abstractmethod
    def apply_update(self, samples: int) -> None:
        """Optimizer step with the gradients accumulated over ``samples`` samples, then clear them."""


class TensorStageCompute(StageCompute):
    """Numerics mode: a real :class:`PipelineStage` and its AdamW optimizer.

    Gradients are accumulated as sums over samples (the tail backpropagates the loss summed
    over the micro-batch's sequences) and divided by the sample count at the update, so an
    update equals a step on the mean loss of every sample it covers, whatever the micro-batching.
    """

    def __init__(self, stage: PipelineStage, optim: OptimConfig):
        super().__init__(stage.cfg, stage.index, stage.num_stages, stage.layer_range)
        self.module = stage
        self.optim = optim
        self.parameters = [p for p in stage.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
            weight_decay=optim.weight_decay,
        )

    def forward(self, inputs: Payload) -> Payload:
        with torch.no_grad():
            return self.module(inputs)

    def _input_leaf(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs if self.is_head else inputs.detach().requires_grad_(True)

    def backward(self, inputs: Payload, grad_outputs: Payload) -> Payload | None:
        if not isinstance(grad_outputs, torch.Tensor) or not torch.isfinite(grad_outputs).all():
            raise ValueError(f"stage {self.index}: gradient from the next stage is missing or not finite")
        x = self._input_leaf(inputs)
        outputs = self.module(x)
        if grad_outputs.shape != outputs.shape or grad_outputs.dtype != outputs.dtype:
            raise ValueError(
                f"stage {self.index}: gradient of shape {tuple(grad_outputs.shape)} {grad_outputs.dtype} does not "
                f"match the output {tuple(outputs.shape)} {outputs.dtype}"
            )
        outputs.backward(grad_outputs)
        return None if self.is_head else x.grad

    def tail(self, inputs: Payload, targets: Payload) -> tuple[float | None, Payload | None]:
        x = self._input_leaf(inputs)
        loss = self.module.loss(self.module(x), targets)
        (loss * x.shape[0]).backward()
        return loss.item(), (None if self.is_head else x.grad)

    def apply_update(self, samples: int) -> None:
        for param in self.parameters:
            if param.grad is not None:
                param.grad.div_(samples)
        if self.optim.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.optim.clip_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.optim.lr * self.optim.lr_factor(self.updates)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1


class CostStageCompute(StageCompute):
    """Timing mode: shapes and FLOPs only, so Node0-scale models simulate in seconds."""

    def __init__(self, cfg: ModelConfig, index: int, num_stages: int, layer_range: range, dtype: torch.dtype):
        super().__init__(cfg, index, num_stages, layer_range)
        self.dtype = dtype

    def _hidden(self, inputs: Payload) -> TensorSpec:
        batch, seq_len = leading_dims(inputs)
        return TensorSpec((batch, seq_len, self.cfg.dim), self.dtype)

    def forward(self, inputs: Payload) -> Payload:
        if self.is_tail:
            batch, seq_len = leading_dims(inputs)
            return TensorSpec((batch, seq_len, self.cfg.vocab_size), self.dtype)
        return self._hidden(inputs)

    def backward(self, inputs: Payload, grad_outputs: Payload) -> Payload | None:
        return None if self.is_head else self._hidden(inputs)

    def tail(self, inputs: Payload, targets: Payload) -> tuple[float | None, Payload | None]:
        return None, (None if self.is_head else self._hidden(inputs))

    def apply_update(self, samples: int) -> None:
        self.updates += 1


def is_finite_number(value: float | None) -> bool:
    """True for a finite float (used to validate losses reported by peers)."""
    return value is not None and math.isfinite(value)
