"""Backend-independent pieces of a run: the model, the stages' compute, the data, evaluation.

A micro-batch's path: ``TokenMicroBatches`` cuts a global batch from the data stream ->
``Trainer`` sends it through ``StageServer`` handlers -> each server's ``StageCompute`` runs
the stage (real tensors) or charges its cost (timing mode) -> the tail returns the loss.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from node0sim.config import ConfigError, RunConfig
from node0sim.data import TokenBatches, build_data
from node0sim.data.tokenizer import load_tokenizer
from node0sim.model import ModelConfig, build_stages, stage_parameter_count, stage_shapes
from node0sim.model.subspace import SubspaceBasis, load_basis, load_basis_from_hub, make_basis
from node0sim.protocol.codecs import make_codec, rank_for
from node0sim.protocol.messages import ForwardResponse, Payload, TensorSpec
from node0sim.protocol.stage_compute import CostStageCompute, StageCompute, TensorStageCompute


def model_config(run: RunConfig, vocab_size: int | None) -> ModelConfig:
    """The model of the run (validated by ``load_run_config``); ``model.vocab_size: null`` takes the tokenizer's
    vocabulary ``vocab_size`` (None in timing mode, where ``load_run_config`` requires a size)."""
    size = run.model["vocab_size"]
    if size is not None and vocab_size is not None and size < vocab_size:
        raise ConfigError(f"model.vocab_size: {size} is smaller than the tokenizer's {vocab_size}")
    return ModelConfig(**{**run.model, "vocab_size": vocab_size if size is None else size})


HUB_PREFIX = "hf://"


def subspace_basis(run: RunConfig, cfg: ModelConfig) -> SubspaceBasis:
    """The run's shared basis U and fixed embedding T: generated from the seed, or loaded and checked."""
    comp = run.compression
    rank = rank_for(cfg.dim, comp.rate)
    if comp.basis is None:
        return make_basis(cfg.dim, rank, cfg.vocab_size, comp.seed)
    try:
        if comp.basis.startswith(HUB_PREFIX):
            repo_id, _, filename = comp.basis.removeprefix(HUB_PREFIX).rpartition("/")
            return load_basis_from_hub(repo_id, filename, cfg.dim, rank, cfg.vocab_size)
        return load_basis(comp.basis, cfg.dim, rank, cfg.vocab_size)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"compression.basis: {error}") from None


def stage_computes(run: RunConfig, cfg: ModelConfig, device: str = "cpu") -> list[StageCompute]:
    """One compute object per stage: real modules (on ``device``) in numerics mode, cost-only otherwise."""
    num_stages = run.topology.num_stages
    comp = run.compression
    if not run.sim.numerics:
        dtype = getattr(torch, run.sim.timing_dtype)
        codec = make_codec(comp.name, cfg.dim, comp.rate, comp.bits, activation_bytes=dtype.itemsize)
        return [
            CostStageCompute(cfg, index, num_stages, layers, codec, dtype, run.optim.name)
            for index, (layers, _, _) in enumerate(stage_shapes(cfg, num_stages))
        ]
    total = sum(stage_parameter_count(cfg, *shape) for shape in stage_shapes(cfg, num_stages))
    if total > run.sim.max_numerics_params:
        raise ConfigError(
            f"model={cfg.name} has {total:,} parameters, over sim.max_numerics_params "
            f"({run.sim.max_numerics_params:,}); use timing mode: sim.numerics=false"
        )
    basis = subspace_basis(run, cfg) if comp.name in ("subspace", "random_projection") else None
    codec = make_codec(comp.name, cfg.dim, comp.rate, comp.bits, basis=basis)
    constraint = basis if comp.name == "subspace" else None
    fixed = constraint.fixed_embedding if constraint is not None else None
    optim = run.optim if run.optim.total_steps else replace(run.optim, total_steps=run.train.steps)
    return [
        TensorStageCompute(stage, optim, codec, constraint, device, comp.project_gradients)
        for stage in build_stages(cfg, num_stages, run.seed, fixed_embedding=fixed)
    ]


def activation_bytes(run: RunConfig, dim: int) -> int:
    """Wire bytes of one micro-batch's activations at a stage boundary (a forward response), through the run's codec."""
    dtype = torch.float32 if run.sim.numerics else getattr(torch, run.sim.timing_dtype)
    comp = run.compression
    codec = make_codec(comp.name, dim, comp.rate, comp.bits, activation_bytes=dtype.itemsize)  # sizes only: no basis
    return ForwardResponse(codec.activation_spec(run.train.micro_batch_size, run.train.seq_len, dim, dtype)).wire_bytes()


class TokenMicroBatches:
    """Cuts global batches of the training stream into micro-batches of ``(inputs, targets)``."""

    def __init__(self, batches: TokenBatches, micro_batch_size: int):
        self.batches = batches
        self.micro_batch_size = micro_batch_size
        self._pending: list[torch.Tensor] = []

    def next_micro_batch(self) -> tuple[Payload, Payload]:
        if not self._pending:
            self._pending = list(self.batches.next_batch().split(self.micro_batch_size))
        window = self._pending.pop(0)
        return window[:, :-1], window[:, 1:]


class SpecMicroBatches:
    """Timing mode: micro-batches described by shape only."""

    def __init__(self, micro_batch_size: int, seq_len: int):
        self.spec = TensorSpec((micro_batch_size, seq_len), torch.int64)

    def next_micro_batch(self) -> tuple[Payload, Payload]:
        return self.spec, self.spec


def micro_batch_sources(
    run: RunConfig,
) -> tuple[list[TokenMicroBatches] | list[SpecMicroBatches], list[torch.Tensor], int | None]:
    """Each trainer's micro-batches (its own shuffle of the data), validation batches, the vocabulary size."""
    trainers = run.topology.num_trainers
    if not run.sim.numerics:
        return [SpecMicroBatches(run.train.micro_batch_size, run.train.seq_len) for _ in range(trainers)], [], None
    sources = []
    for index in range(trainers):
        try:
            train, validation, tokenizer = build_data(
                run.data, run.train.seq_len, run.train.batch_size, run.seed + 1000 * index, max(1, run.train.eval_batches)
            )
        except ValueError as error:  # the data cannot serve this configuration (too little of it for seq_len, ...)
            raise ConfigError(f"data: {error}") from None
        sources.append(TokenMicroBatches(train, run.train.micro_batch_size))
    return sources, validation[: run.train.eval_batches], tokenizer.vocab_size


def vocabulary_size(run: RunConfig) -> int | None:
    """The tokenizer's vocabulary (None in timing mode), without loading any data."""
    return load_tokenizer(run.data.tokenizer).vocab_size if run.sim.numerics else None


def evaluate(computes: list[StageCompute], batches: list[torch.Tensor]) -> float | None:
    """Mean validation loss of the pipeline, through the same boundary codec as training; None without tensors."""
    if not batches or not all(isinstance(c, TensorStageCompute) for c in computes):
        return None
    losses = []
    for batch in batches:
        ids = batch[:, :-1]
        x = ids
        for compute in computes:
            x = compute.forward(x, ids)
        losses.append(computes[-1].module.loss(x, batch[:, 1:]).item())
    return sum(losses) / len(losses)
