"""What a stage server computes: real tensors (numerics mode) or only sizes and FLOPs (timing mode).

Both implementations expose the same operations and FLOP costs, so the stage server and the
network see identical traffic and compute time in either mode.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Callable, TypeVar

import torch

from node0sim.model import ModelConfig, PipelineStage
from node0sim.model.costs import (
    ComputeCost,
    optimizer_step_cost,
    stage_backward_flops,
    stage_forward_cost,
    stage_forward_flops,
    stage_parameter_count,
    stage_parameter_shapes,
    stage_training_cost,
)
from node0sim.model.subspace import SubspaceBasis, project_gradients_onto_subspace_, project_onto_subspace_
from node0sim.protocol.codecs import Codec
from node0sim.protocol.messages import Packed, Payload, TensorSpec, leading_dims
from node0sim.protocol.optimizers import OPTIMIZERS, STATE_LAYOUTS, build_optimizer, set_momentum, stage_lr_scale, stage_momentum
from node0sim.protocol.tensors import describe

OPTIMIZER_FLOPS_PER_PARAM = 12
"""AdamW step cost: a dozen elementwise operations per parameter."""

T = TypeVar("T")


@dataclass(frozen=True)
class Work:
    """One request's part of a batched call: its inputs, token ids, gradient (backward) and targets (tail).

    ``accumulate`` False: a backward or tail that only returns the input gradient (and loss), leaving the parameters'
    accumulated gradients as they are (a retry whose first attempt may be accumulated by the peer that timed out)."""

    inputs: Payload
    token_ids: Payload | None = None
    grad_outputs: Payload | None = None
    targets: Payload | None = None
    accumulate: bool = True


def _single(results: list[T | ValueError]) -> T:
    """The only result of a one-request batch; a rejection is raised."""
    (result,) = results
    if isinstance(result, ValueError):
        raise result
    return result


@dataclass(frozen=True)
class OptimConfig:
    """The stage optimizer (AdamW by default) with linear warmup then linear decay (Node0's schedule) and clipping.

    Node0 trains with lr 3e-4; the default suits the tiny CPU model. ``total_steps`` None (or 0) keeps ``lr``
    constant after warmup; a run fills in ``train.steps`` (decay to ``min_lr_ratio`` x lr at its end) unless it is set.
    ``name``: adamw, nesterov_async (NAdam with decoupled weight decay) or nag_delay (the explicit weight-space
    update); see node0sim/protocol/optimizers.py.
    """

    name: str = "adamw"
    lr: float = 0.003
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 5
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of ``lr``: the factor is max(min_lr_ratio, linear decay) (Node0: 0.1)."""
    clip_grad_norm: float = 1.0
    """Max gradient norm of every stage (0: no clipping), the tail's too unless ``tail_clip_grad_norm`` is set."""
    tail_clip_grad_norm: float | None = None
    """Max gradient norm of the last stage (None: ``clip_grad_norm``; Node0: 0.8838835 on the tail, 0.1767767 elsewhere)."""
    momentum_decay: float = 0.004
    """nesterov_async: NAdam's psi; its momentum ramps as mu_t = beta1 (1 - 0.5 * 0.96^(t psi)), so 0.004 (PyTorch's
    and the paper's) reaches mu ~ beta1 only after ~50k steps; short runs need a larger psi."""
    gamma: float = 0.99
    """nag_delay: the look-ahead momentum (the paper's gamma; 0.99 as its beta1)."""
    nag_discount: bool = True
    """nag_delay: scale the gradient by (1 - gamma) (the paper's discount); false is the ablation that diverges."""
    stage_adaptive: bool = False
    """Stage-dependent momentum (0.9 last stage .. 0.99 first) and learning rate (lower where more delayed), paper Eq. 13."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name: {self.name!r} is not one of {list(OPTIMIZERS)}")
        for name in ("gamma", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("lr", "eps", "weight_decay", "clip_grad_norm", "tail_clip_grad_norm", "momentum_decay", "warmup_steps", "total_steps"):
            value = getattr(self, name)
            positive = name in ("lr", "eps")
            if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                raise ValueError(f"optim.{name}: must be a finite number {'> 0' if positive else '>= 0'}, got {value}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based); no ``total_steps`` means constant after warmup."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps:
            span = max(1, self.total_steps - self.warmup_steps)
            return max(self.min_lr_ratio, 1.0 - (step - self.warmup_steps) / span)
        return 1.0

    def clip_norm(self, is_tail: bool) -> float:
        """The max gradient norm of a stage (0: no clipping)."""
        return self.tail_clip_grad_norm if is_tail and self.tail_clip_grad_norm is not None else self.clip_grad_norm


class StageCompute(ABC):
    """Forward, backward (with recomputation), tail and optimizer step of one pipeline stage.

    ``inputs`` are token ids on the head and boundary payloads (as encoded by the run's codec)
    elsewhere; ``token_ids`` are the micro-batch's tokens when the codec needs them.
    """

    def __init__(self, cfg: ModelConfig, index: int, num_stages: int, layer_range: range, codec: Codec):
        self.cfg = cfg
        self.index = index
        self.num_stages = num_stages
        self.layer_range = layer_range
        self.codec = codec
        self.is_head = index == 0
        self.is_tail = index == num_stages - 1
        self.num_params = stage_parameter_count(cfg, layer_range, self.is_head, self.is_tail)
        self.parameter_shapes = stage_parameter_shapes(cfg, layer_range, self.is_head, self.is_tail)
        """Shapes of the trainable tensors, in the order of the flat gradient and parameter vectors."""
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

    def forward_cost(self, inputs: Payload) -> ComputeCost:
        """The operations of one forward pass on ``inputs`` (FLOPs: :meth:`forward_flops`)."""
        batch, seq_len = leading_dims(inputs)
        return stage_forward_cost(self.cfg, self.layer_range, self.is_head, self.is_tail, batch, seq_len)

    def backward_cost(self, inputs: Payload) -> ComputeCost:
        """The operations of a recomputed forward pass plus the backward pass (FLOPs: :meth:`backward_flops`)."""
        batch, seq_len = leading_dims(inputs)
        return stage_training_cost(self.cfg, self.layer_range, self.is_head, self.is_tail, batch, seq_len)

    def step_cost(self) -> ComputeCost:
        """One optimizer step: ``OPTIMIZER_FLOPS_PER_PARAM`` FLOPs per parameter, bound by its memory traffic."""
        return optimizer_step_cost(self.num_params, len(self.state_layout.tensors), OPTIMIZER_FLOPS_PER_PARAM)

    @property
    @abstractmethod
    def activation_dtype(self) -> torch.dtype:
        """The dtype of the stage's activations and their gradients, before the codec."""

    def output_spec(self, batch: int, seq_len: int, per_token_loss: bool = False) -> Payload:
        """The layout of a forward's outputs: the encoded activations; on the tail the logits, or with ``per_token_loss``
        the per-token loss [B, T] (float32, as Node0's)."""
        if self.is_tail and per_token_loss:
            return TensorSpec((batch, seq_len), torch.float32)
        if self.is_tail:
            return TensorSpec((batch, seq_len, self.cfg.vocab_size), self.activation_dtype)
        return self.codec.activation_spec(batch, seq_len, self.cfg.dim, self.activation_dtype)

    def input_grad_spec(self, batch: int, seq_len: int) -> Payload | None:
        """The layout of a backward's encoded input gradient (None on the head: token ids have none)."""
        return None if self.is_head else self.codec.grad_spec(batch, seq_len, self.cfg.dim, self.activation_dtype)

    def forward(self, inputs: Payload, token_ids: Payload | None, targets: Payload | None = None) -> Payload:
        """The stage's encoded output (on the tail: the logits, or with ``targets`` the per-token loss [B, T]); no state
        is kept."""
        return _single(self.forward_batch([Work(inputs, token_ids, targets=targets)]))

    def backward(
        self, inputs: Payload, token_ids: Payload | None, grad_outputs: Payload, targets: Payload | None = None
    ) -> Payload | None:
        """Recompute the forward pass, accumulate parameter gradients, return the encoded input gradient.

        On the tail ``targets`` are required and ``grad_outputs`` is the gradient of the per-token loss [B, T]
        (the tail served in separate forward and backward calls, as Node0 serves it)."""
        return _single(self.backward_batch([Work(inputs, token_ids, grad_outputs=grad_outputs, targets=targets)]))

    def tail(self, inputs: Payload, token_ids: Payload | None, targets: Payload) -> tuple[float | None, Payload | None]:
        """Forward, loss and backward on the last stage: ``(mean loss, encoded input gradient)``."""
        return _single(self.tail_batch([Work(inputs, token_ids, targets=targets)]))

    @abstractmethod
    def forward_batch(self, works: list[Work]) -> list[Payload | ValueError]:
        """:meth:`forward` of several requests in one call; a malformed request gets its ValueError."""

    @abstractmethod
    def backward_batch(self, works: list[Work]) -> list[Payload | None | ValueError]:
        """:meth:`backward` of several requests in one call (gradients accumulate over all accepted ones)."""

    @abstractmethod
    def tail_batch(self, works: list[Work]) -> list[tuple[float | None, Payload | None] | ValueError]:
        """:meth:`tail` of several requests in one call, each with its own mean loss."""

    @abstractmethod
    def take_gradients(self) -> Payload:
        """The accumulated gradients as one flat vector (sums over samples); accumulation restarts from zero."""

    @abstractmethod
    def step_with(self, mean_gradients: Payload, delay: float | None = None) -> None:
        """One optimizer step with these (mean, flat) gradients; gradients accumulated meanwhile are kept.

        ``delay``: the stage's measured mean delay (updates between a forward and its backward), which
        ``optim.stage_adaptive`` sets momentum and learning rate from; None: the expected delay S - 1 - s.
        """

    @abstractmethod
    def sparta_index(self, fraction: float, seed: int) -> Any:
        """The ``fraction`` of parameter entries averaged this round: the same for every peer given ``seed``."""

    @abstractmethod
    def partition_index(self, num_parts: int, part: int, seed: int) -> Any:
        """Entries of part ``part`` of a fixed random partition of the flat vector into ``num_parts`` parts of
        (nearly) equal size, the same for every peer given ``seed`` (Node0's SPARTA partition)."""

    @abstractmethod
    def parameter_values(self, index: torch.Tensor | None) -> Payload:
        """The flat parameter vector, or its entries at ``index`` (SPARTA's partial averaging)."""

    @abstractmethod
    def state_values(self, index: Any) -> Payload:
        """The parameters at ``index`` followed by each optimizer state tensor (``state_layout.tensors``) at
        ``index``: what ``averaging.state_averaging=partition`` averages."""

    @abstractmethod
    def set_state_values(self, values: Payload, index: Any) -> None:
        """Overwrite what :meth:`state_values` returned (optimizer state only where the optimizer has stepped)."""

    @abstractmethod
    def set_parameter_values(self, values: Payload, index: torch.Tensor | None) -> None:
        """Overwrite the flat parameter vector (or the entries at ``index``)."""

    @abstractmethod
    def export_state(self) -> Payload:
        """Parameters and optimizer state, for a peer that joins or fell too far behind."""

    @abstractmethod
    def import_state(self, state: Payload) -> None:
        """Load what :meth:`export_state` produced on another peer of the same stage."""

    def apply_update(self, samples: int) -> None:
        """Local optimizer step with the gradients accumulated over ``samples`` samples."""
        self.step_with(self.take_gradients() / samples)


class TensorStageCompute(StageCompute):
    """Numerics mode: a real :class:`PipelineStage` and its AdamW optimizer.

    Gradients are accumulated as sums over samples (the tail backpropagates the loss summed
    over the micro-batch's sequences) and divided by the sample count at the update, so an
    update equals a step on the mean loss of every sample it covers, whatever the micro-batching.
    With a subspace ``basis``, the boundary-crossing output projections are projected onto it at
    construction and after every update, which keeps subspace compression exact; with ``project_gradients``
    their gradients are projected before the step too (false: only the weights after it, as Node0's ``ss_regularize``,
    so Adam's moments also see the part of the gradient outside the subspace).

    ``device``: where the stage's weights, optimizer state and tensor work live (a live peer's GPU).
    Everything that crosses the class boundary (requests, responses, flat gradient and parameter
    vectors, exported state) is on the CPU, where the codec, the network and the averaging work.
    """

    def __init__(
        self, stage: PipelineStage, optim: OptimConfig, codec: Codec, basis: SubspaceBasis | None = None,
        device: torch.device | str = "cpu", project_gradients: bool = True,
    ):
        super().__init__(stage.cfg, stage.index, stage.num_stages, stage.layer_range, codec)
        self.device = torch.device(device)
        if basis is not None:
            project_onto_subspace_(stage, basis)
            basis = replace(basis, basis=basis.basis.to(self.device))  # the projections run next to the weights
        self.module = stage.to(self.device)
        self.optim = optim
        self.basis = basis
        self.project_gradients = project_gradients
        self.parameters = [p for p in stage.parameters() if p.requires_grad]
        self.parameter_shapes = [tuple(p.shape) for p in self.parameters]
        self.optimizer = build_optimizer(self.parameters, optim, self.index, self.num_stages)
        self.state_layout = STATE_LAYOUTS[optim.name]
        self._partition: tuple[tuple[int, int], list[torch.Tensor]] | None = None
        """The fixed partition of :meth:`partition_index`, by (parts, seed): made once."""

    def _stage_input(self, work: Work) -> torch.Tensor:
        """The decoded input of one request, checked: [B, T] token ids on the head, finite [B, T, dim] elsewhere."""
        if self.is_head:
            x = work.inputs
            if not _are_token_ids(x, self.cfg.vocab_size) or x.dim() != 2:
                raise ValueError(f"stage {self.index}: expected token ids [B, T] < {self.cfg.vocab_size}, got {describe(x)}")
            return x.to(self.device)
        x = self.codec.decode(work.inputs, work.token_ids)
        if x.dim() != 3 or x.shape[2] != self.cfg.dim or x.dtype != self.activation_dtype:
            raise ValueError(
                f"stage {self.index}: expected activations of shape [B, T, {self.cfg.dim}] {self.activation_dtype}, got {describe(x)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"stage {self.index}: input activations are not finite")
        return x.to(self.device)

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.parameters[0].dtype

    def _checked_grad(self, work: Work, x: torch.Tensor) -> torch.Tensor:
        grad = self.codec.decode_grad(work.grad_outputs)
        shape = (*x.shape[:2], self.cfg.dim)
        if grad.shape != shape or grad.dtype != self.activation_dtype:
            raise ValueError(f"stage {self.index}: gradient {describe(grad)} does not match the output {shape} {self.activation_dtype}")
        if not torch.isfinite(grad).all():
            raise ValueError(f"stage {self.index}: output gradient is not finite")
        return grad.to(self.device)

    def _checked_targets(self, work: Work, x: torch.Tensor) -> torch.Tensor:
        targets = work.targets
        if not _are_token_ids(targets, self.cfg.vocab_size) or tuple(targets.shape) != tuple(x.shape[:2]):
            raise ValueError(f"stage {self.index}: targets must be token ids {tuple(x.shape[:2])}, got {describe(targets)}")
        return targets.to(self.device)

    def _optional_targets(self, work: Work, x: torch.Tensor) -> torch.Tensor | None:
        return None if work.targets is None else self._checked_targets(work, x)

    def _checked_loss_grad(self, work: Work, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A tail backward's targets and per-token loss gradient [B, T] float32, checked."""
        targets = self._checked_targets(work, x)
        grad = work.grad_outputs
        if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != tuple(x.shape[:2]) or grad.dtype != torch.float32:
            raise ValueError(f"stage {self.index}: the loss gradient must be float32 {tuple(x.shape[:2])}, got {describe(grad)}")
        if not torch.isfinite(grad).all():
            raise ValueError(f"stage {self.index}: loss gradient is not finite")
        return targets, grad.to(self.device)

    def _batches(
        self, works: list[Work], results: list[Any], check: Callable[[Work, torch.Tensor], Any] | None = None
    ) -> list[tuple[list[int], list[torch.Tensor], list[Any]]]:
        """Accepted requests grouped by input shape and ``accumulate``: (indices, inputs, checked extras); rejections go to
        ``results``."""
        groups: dict[tuple[int, ...], tuple[list[int], list[torch.Tensor], list[Any]]] = {}
        for i, work in enumerate(works):
            try:
                x = self._stage_input(work)
                extra = check(work, x) if check is not None else None
            except ValueError as rejected:
                results[i] = rejected
                continue
            indices, xs, extras = groups.setdefault((work.accumulate, *x.shape[1:]), ([], [], []))
            indices.append(i)
            xs.append(x)
            extras.append(extra)
        return list(groups.values())

    def _leaves(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs that collect their own gradient (token ids on the head have none)."""
        return xs if self.is_head else [x.detach().requires_grad_(True) for x in xs]

    def forward_batch(self, works: list[Work]) -> list[Payload | ValueError]:
        results: list[Any] = [None] * len(works)
        with torch.no_grad():
            for indices, xs, targets in self._batches(works, results, self._optional_targets if self.is_tail else None):
                outputs = self.module(torch.cat(xs)).split([len(x) for x in xs])
                for i, out, target in zip(indices, outputs, targets):
                    if not self.is_tail:
                        results[i] = self.codec.encode(out.cpu(), works[i].token_ids)
                    else:
                        results[i] = (out if target is None else self.module.token_losses(out, target)).cpu()
        return results

    def _encoded_input_grad(self, x: torch.Tensor) -> Payload | None:
        return None if self.is_head else self.codec.encode_grad(x.grad.cpu())

    def _backprop(self, outputs: torch.Tensor, grad_outputs: torch.Tensor | None, leaves: list[torch.Tensor], accumulate: bool) -> None:
        """Backward from ``outputs``: into the parameters' gradients and the input leaves' (``accumulate``), or into the
        input leaves' only (none on the head, whose inputs are token ids)."""
        if accumulate:
            outputs.backward(grad_outputs)
        elif not self.is_head:
            for leaf, grad in zip(leaves, torch.autograd.grad(outputs, leaves, grad_outputs)):
                leaf.grad = grad

    def backward_batch(self, works: list[Work]) -> list[Payload | None | ValueError]:
        results: list[Any] = [None] * len(works)
        for indices, xs, extras in self._batches(works, results, self._checked_loss_grad if self.is_tail else self._checked_grad):
            leaves = self._leaves(xs)
            outputs = self.module(torch.cat(leaves))
            if self.is_tail:  # recompute the per-token loss and backpropagate its gradient
                targets, grads = zip(*extras)
                outputs = self.module.token_losses(outputs, torch.cat(targets))
            else:
                grads = extras
            self._backprop(outputs, torch.cat(grads), leaves, works[indices[0]].accumulate)
            for i, leaf in zip(indices, leaves):
                results[i] = self._encoded_input_grad(leaf)
        return results

    def tail_batch(self, works: list[Work]) -> list[tuple[float | None, Payload | None] | ValueError]:
        results: list[Any] = [None] * len(works)
        for indices, xs, targets in self._batches(works, results, self._checked_targets):
            leaves = self._leaves(xs)
            logits = self.module(torch.cat(leaves)).split([len(x) for x in xs])
            losses = [self.module.loss(out, t) for out, t in zip(logits, targets)]
            # each micro-batch's mean loss times its sequence count: gradients are sums over samples
            self._backprop(sum(loss * len(x) for loss, x in zip(losses, xs)), None, leaves, works[indices[0]].accumulate)
            for i, loss, leaf in zip(indices, losses, leaves):
                results[i] = (loss.item(), self._encoded_input_grad(leaf))
        return results

    def _flat_grads(self) -> torch.Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.parameters
        ])

    def _load_grads(self, flat: torch.Tensor) -> None:
        for param, chunk in zip(self.parameters, flat.split([p.numel() for p in self.parameters])):
            param.grad = chunk.view_as(param).clone()

    def take_gradients(self) -> Payload:
        flat = self._flat_grads().cpu()
        self.optimizer.zero_grad(set_to_none=True)
        return flat

    def step_with(self, mean_gradients: Payload, delay: float | None = None) -> None:
        if not isinstance(mean_gradients, torch.Tensor) or mean_gradients.shape != (self.num_trainable,):
            raise ValueError(f"stage {self.index}: averaged gradients must be a flat tensor of {self.num_trainable} values")
        if not torch.isfinite(mean_gradients).all():
            raise ValueError(f"stage {self.index}: averaged gradients are not finite")
        accumulated_meanwhile = self._flat_grads()
        self._load_grads(mean_gradients.to(self.device))
        if self.basis is not None and self.project_gradients:
            project_gradients_onto_subspace_(self.module, self.basis)
        clip_norm = self.optim.clip_norm(self.is_tail)
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, clip_norm)
        if self.optim.stage_adaptive:
            set_momentum(self.optimizer, stage_momentum(self.optim, self.index, self.num_stages, delay))
        for group in self.optimizer.param_groups:
            group["lr"] = self.optim.lr * self.optim.lr_factor(self.updates) * stage_lr_scale(
                self.optim, self.index, self.num_stages, self.updates, delay
            )
        self.optimizer.step()
        self._load_grads(accumulated_meanwhile)
        if self.basis is not None:
            project_onto_subspace_(self.module, self.basis)
        self.updates += 1

    @property
    def num_trainable(self) -> int:
        """Number of trainable parameter values (the length of flat vectors)."""
        return sum(p.numel() for p in self.parameters)

    def sparta_index(self, fraction: float, seed: int) -> Any:
        count = max(1, int(self.num_trainable * fraction))
        generator = torch.Generator().manual_seed(seed % 2**63)
        return torch.randperm(self.num_trainable, generator=generator)[:count]

    @torch.no_grad()
    def parameter_values(self, index: torch.Tensor | None) -> Payload:
        flat = torch.cat([p.reshape(-1) for p in self.parameters]).cpu()
        return flat if index is None else flat[index]

    @torch.no_grad()
    def set_parameter_values(self, values: Payload, index: torch.Tensor | None) -> None:
        flat = self.parameter_values(None)
        if index is None:
            flat = values
        else:
            flat[index] = values
        if not isinstance(flat, torch.Tensor) or flat.shape != (self.num_trainable,) or not torch.isfinite(flat).all():
            raise ValueError(f"stage {self.index}: parameter values have the wrong shape or are not finite")
        for param, chunk in zip(self.parameters, flat.split([p.numel() for p in self.parameters])):
            param.copy_(chunk.view_as(param))  # copy_ moves the values to the parameter's device
        if self.basis is not None:
            project_onto_subspace_(self.module, self.basis)

    def partition_index(self, num_parts: int, part: int, seed: int) -> Any:
        if self._partition is None or self._partition[0] != (num_parts, seed):
            generator = torch.Generator().manual_seed(seed % 2**63)
            order = torch.randperm(self.num_trainable, generator=generator)
            self._partition = ((num_parts, seed), [order[j::num_parts].sort().values for j in range(num_parts)])
        return self._partition[1][part % num_parts]

    def state_values(self, index: Any) -> Payload:
        return torch.cat([self.parameter_values(index), *(self._state_tensor(key)[index] for key in self.state_layout.tensors)])

    @torch.no_grad()
    def set_state_values(self, values: Payload, index: Any) -> None:
        keys = self.state_layout.tensors
        if not isinstance(values, torch.Tensor) or values.shape != ((1 + len(keys)) * len(index),):
            raise ValueError(f"stage {self.index}: state values must be {(1 + len(keys)) * len(index)} values, got {describe(values)}")
        chunks = values.split(len(index))
        self.set_parameter_values(chunks[0], index)
        if not all(self.optimizer.state.get(p) for p in self.parameters):
            return  # no optimizer state yet: the moments start from the averaged parameters' first step
        sizes = [p.numel() for p in self.parameters]
        for key, chunk in zip(keys, chunks[1:]):
            flat = self._state_tensor(key)
            flat[index] = chunk
            for param, piece in zip(self.parameters, flat.split(sizes)):
                self.optimizer.state[param][key].copy_(piece.view_as(param))

    def _state_tensor(self, key: str) -> torch.Tensor:
        """The optimizer's ``key`` tensors of every parameter as one flat vector (zeros before the first step)."""
        return torch.cat([
            self.optimizer.state.get(p, {}).get(key, torch.zeros_like(p)).reshape(-1) for p in self.parameters
        ]).cpu()

    def _state_scalars(self, key: str) -> torch.Tensor:
        """The optimizer's ``key`` scalar of every parameter, one entry each (ones before the first step)."""
        return torch.stack([
            self.optimizer.state.get(p, {}).get(key, torch.ones(())).reshape(()) for p in self.parameters
        ]).cpu()

    def export_state(self) -> Payload:
        layout = self.state_layout
        parts = {
            "parameters": self.parameter_values(None).clone(),
            **{key: self._state_tensor(key) for key in layout.tensors},
            **{key: self._state_scalars(key) for key in layout.scalars},
            "updates": torch.tensor([self.updates], dtype=torch.int64),
        }
        return Packed(parts, shape=(self.num_trainable,))

    def import_state(self, state: Payload) -> None:
        layout = self.state_layout
        expected = {"parameters", *layout.tensors, *layout.scalars, "updates"}
        if not isinstance(state, Packed) or set(state.parts) != expected:
            raise ValueError(f"stage {self.index}: malformed state payload (expected parts {sorted(expected)})")
        lengths = {**dict.fromkeys(layout.tensors, self.num_trainable), **dict.fromkeys(layout.scalars, len(self.parameters))}
        for key, length in lengths.items():
            part = state.parts[key]
            if not isinstance(part, torch.Tensor) or part.shape != (length,) or not torch.isfinite(part).all():
                raise ValueError(f"stage {self.index}: optimizer state {key!r} must be {length} finite values, got {describe(part)}")
        self.set_parameter_values(state.parts["parameters"], None)
        updates = int(state.parts["updates"].item())
        sizes = [p.numel() for p in self.parameters]
        tensors = {key: state.parts[key].split(sizes) for key in layout.tensors}
        for i, param in enumerate(self.parameters):
            entry = {key: chunks[i].view_as(param).to(self.device, copy=True) for key, chunks in tensors.items()}
            entry.update({key: state.parts[key][i].clone() for key in layout.scalars})
            if layout.has_step:  # torch's Adam family counts its steps per parameter: one per update here
                entry["step"] = torch.tensor(float(updates))
            self.optimizer.state[param] = entry
        self.updates = updates


class CostStageCompute(StageCompute):
    """Timing mode: payload shapes and FLOPs only, so Node0-scale models simulate in seconds."""

    def __init__(
        self, cfg: ModelConfig, index: int, num_stages: int, layer_range: range, codec: Codec, dtype: torch.dtype,
        optimizer: str = "adamw",
    ):
        super().__init__(cfg, index, num_stages, layer_range, codec)
        self.dtype = dtype
        self.state_layout = STATE_LAYOUTS[optimizer]

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.dtype

    def _output_spec(self, work: Work) -> Payload:
        return self.output_spec(*leading_dims(work.inputs), per_token_loss=work.targets is not None)

    def _grad_spec(self, work: Work) -> Payload | None:
        return self.input_grad_spec(*leading_dims(work.inputs))

    def forward_batch(self, works: list[Work]) -> list[Payload | ValueError]:
        return [self._output_spec(work) for work in works]

    def backward_batch(self, works: list[Work]) -> list[Payload | None | ValueError]:
        return [self._grad_spec(work) for work in works]

    def tail_batch(self, works: list[Work]) -> list[tuple[float | None, Payload | None] | ValueError]:
        return [(None, self._grad_spec(work)) for work in works]

    def _flat_spec(self, index: torch.Tensor | None = None) -> TensorSpec:
        return TensorSpec((self.num_params if index is None else len(index),), torch.float32)

    def take_gradients(self) -> Payload:
        return self._flat_spec()

    def step_with(self, mean_gradients: Payload, delay: float | None = None) -> None:
        self.updates += 1

    def sparta_index(self, fraction: float, seed: int) -> Any:
        return range(max(1, int(self.num_params * fraction)))

    def partition_index(self, num_parts: int, part: int, seed: int) -> Any:
        return range(len(range(part % num_parts, self.num_params, num_parts)))

    def parameter_values(self, index: torch.Tensor | None) -> Payload:
        return self._flat_spec(index)

    def state_values(self, index: Any) -> Payload:
        return TensorSpec(((1 + len(self.state_layout.tensors)) * len(index),), torch.float32)

    def set_state_values(self, values: Payload, index: Any) -> None:
        """Nothing to overwrite in timing mode."""

    def set_parameter_values(self, values: Payload, index: torch.Tensor | None) -> None:
        """Nothing to overwrite in timing mode."""

    def export_state(self) -> Payload:
        spec = self._flat_spec()
        scalars = TensorSpec((len(self.parameter_shapes),), torch.float32)
        parts = {"parameters": spec, **dict.fromkeys(self.state_layout.tensors, spec), **dict.fromkeys(self.state_layout.scalars, scalars)}
        return Packed(parts, shape=spec.shape)

    def import_state(self, state: Payload) -> None:
        """Nothing to load in timing mode."""


def _are_token_ids(value: Any, vocab_size: int) -> bool:
    return (
        isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and not value.dtype.is_complex
        and value.dtype != torch.bool and value.numel() > 0
        and bool(value.min() >= 0) and bool(value.max() < vocab_size)
    )
