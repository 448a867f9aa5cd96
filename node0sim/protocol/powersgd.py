"""PowerSGD gradient averaging (Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient
Compression"), as hivemind's PowerSGDGradientAverager does it: two all-reduce phases per round.

For every gradient matrix M (m x n) with this peer's error feedback e: M' = M + e;
phase 1 all-reduces P = M' Q (m x r) (plus the uncompressed tensors); P is orthonormalized;
phase 2 all-reduces Q = M'^T P (n x r); the averaged gradient is P Q^T. Matrices whose rank-r
factors would not save at least half of the bytes are sent uncompressed (hivemind's
``min_compression_ratio`` rule).

Two variants of where Q comes from and what the error is:

- fresh (hivemind's): Q is drawn afresh each round from the round's seed, so every member agrees
  without shared state; the new error is M' - P Q^T with the averaged Q.
- warm start (Node0's ``n0/server/power_sgd_averager.py``): the averaged Q of a round is the next
  round's Q (one power iteration per round, so P tracks the top-r subspace of the gradients across
  rounds); it starts from a seed every peer of the stage shares and travels to joiners with the
  state (:meth:`PowerSGD.export_queries`); the error is the local one, M' - P (M'^T P)^T, computed
  before the Q all-reduce.

Either way a failed round (either phase gives no mean) leaves the error feedback and Q as they were
before it (Node0 restores its copy of the error buffers at the start of the next round).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from node0sim.protocol.averaging import Averager
from node0sim.protocol.tensors import Tensor, all_finite, cat, orthonormalize, randn_like, zeros_like

MIN_SAVING = 0.5
"""Compress a matrix only if its factors take at most half of its bytes."""


def compressed(shape: tuple[int, ...], rank: int) -> bool:
    """Whether a tensor of ``shape`` travels as rank-``rank`` factors."""
    return len(shape) == 2 and rank * (shape[0] + shape[1]) <= MIN_SAVING * shape[0] * shape[1]


def phase_lengths(shapes: list[tuple[int, ...]], rank: int) -> tuple[int, int]:
    """Values sent in phase 1 (P factors and uncompressed tensors) and phase 2 (Q factors)."""
    first = sum(shape[0] * rank if compressed(shape, rank) else math.prod(shape) for shape in shapes)
    second = sum(shape[1] * rank for shape in shapes if compressed(shape, rank))
    return first, second


class PowerSGD:
    """One peer's PowerSGD state (error feedback, and the warm-started Q) for one stage; the same code averages
    tensors or specs. ``warm_start``: Node0's variant (module docstring), its first Q drawn from ``init_seed``."""

    def __init__(self, shapes: list[tuple[int, ...]], rank: int, warm_start: bool = False, init_seed: int = 0):
        if rank < 1:
            raise ValueError(f"averaging.powersgd_rank must be >= 1 to compress, got {rank}")
        self.shapes = shapes
        self.rank = rank
        self.warm_start = warm_start
        self.init_seed = init_seed
        self.errors: dict[int, Tensor] = {}
        self.queries: dict[int, Tensor] = {}
        """The warm-started Q of every compressed matrix (empty before the first round, and without warm start)."""

    async def average(
        self, averager: Averager, tag: str, members: list[str], bandwidths: list[float],
        gradients: Tensor, samples: int, seed: int,
    ) -> tuple[Tensor | None, int]:
        """Sample-weighted mean of the group's gradients, low-rank compressed; (mean or None, contributors).
        ``seed``: the round's seed of a fresh Q (unused with warm start)."""
        weight = max(samples, 0)
        local = self._with_errors(gradients, weight)
        queries = self._round_queries(seed, gradients)
        phase1 = cat([
            (m @ queries[i]).reshape(-1) if i in queries else m.reshape(-1) for i, m in enumerate(local)
        ]) * weight
        mean1, contributors = await averager.all_reduce(f"{tag}/p", members, bandwidths, phase1, weight)
        if mean1 is None:
            return None, contributors
        factors, results = self._split_phase1(mean1, queries)
        local_queries = {i: local[i].T @ p for i, p in factors.items()}
        phase2 = cat([q.reshape(-1) for q in local_queries.values()]) * weight if factors else gradients[:0]
        mean2, _ = await averager.all_reduce(f"{tag}/q", members, bandwidths, phase2, weight)
        if mean2 is None:
            return None, contributors
        offset = 0
        for i, p in factors.items():
            count = self.shapes[i][1] * self.rank
            q = mean2[offset:offset + count].view(self.shapes[i][1], self.rank)
            offset += count
            results[i] = p @ q.T
            self.errors[i] = local[i] - (p @ local_queries[i].T if self.warm_start else results[i])
            if self.warm_start:
                self.queries[i] = q
        return cat([results[i].reshape(-1) for i in range(len(self.shapes))]), contributors

    def export_queries(self) -> Tensor | None:
        """The warm-started Q factors as one flat vector (what a joiner receives with the state); None without."""
        if not self.queries:
            return None
        return cat([self.queries[i].reshape(-1) for i in sorted(self.queries)])

    def import_queries(self, flat: Tensor | None) -> None:
        """Continue from a donor's Q factors (:meth:`export_queries`); None: keep this peer's own."""
        if flat is None:
            return
        indices = [i for i, shape in enumerate(self.shapes) if compressed(shape, self.rank)]
        sizes = [self.shapes[i][1] * self.rank for i in indices]
        if flat.dim() != 1 or flat.numel() != sum(sizes) or not all_finite(flat):
            raise ValueError(f"PowerSGD Q factors must be a flat vector of {sum(sizes)} finite values, got shape {tuple(flat.shape)}")
        self.queries = {i: q.view(self.shapes[i][1], self.rank) for i, q in zip(indices, flat.split(sizes))}

    def _with_errors(self, gradients: Tensor, weight: int) -> list[Tensor]:
        """This peer's mean gradient per tensor, plus its error feedback for compressed matrices."""
        tensors = list(gradients.split([math.prod(s) for s in self.shapes]))
        local = []
        for i, (flat, shape) in enumerate(zip(tensors, self.shapes)):
            mean = (flat / weight if weight else zeros_like(flat)).view(shape)
            local.append(mean + self.errors[i] if i in self.errors else mean)
        return local

    def _round_queries(self, seed: int, like: Tensor) -> dict[int, Tensor]:
        """This round's Q per compressed matrix: the warm-started ones, or drawn from ``seed``."""
        if self.warm_start and self.queries:
            return self.queries
        generator = torch.Generator().manual_seed((self.init_seed if self.warm_start else seed) % 2**63)
        return {
            i: randn_like(like, (shape[1], self.rank), generator)
            for i, shape in enumerate(self.shapes) if compressed(shape, self.rank)
        }

    def _split_phase1(self, mean: Tensor, queries: dict[int, Any]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Orthonormalized P factors of compressed matrices, and the averaged uncompressed tensors."""
        factors, results, offset = {}, {}, 0
        for i, shape in enumerate(self.shapes):
            count = shape[0] * self.rank if i in queries else math.prod(shape)
            chunk = mean[offset:offset + count]
            offset += count
            if i in queries:
                factors[i] = orthonormalize(chunk.view(shape[0], self.rank))
            else:
                results[i] = chunk.view(shape)
        return factors, results
