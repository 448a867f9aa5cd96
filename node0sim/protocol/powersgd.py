"""PowerSGD gradient averaging (Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient
Compression"), as hivemind's PowerSGDGradientAverager does it: two all-reduce phases per round.

For every gradient matrix M (m x n) with this peer's error feedback e: M' = M + e;
phase 1 all-reduces P = M' Q (m x r) for a random Q shared by seed (plus the uncompressed
tensors); P is orthonormalized; phase 2 all-reduces Q = M'^T P (n x r); the averaged gradient is
P Q^T and the new error is M' - P Q^T. Matrices whose rank-r factors would not save at least half
of the bytes are sent uncompressed (hivemind's ``min_compression_ratio`` rule). The random Q is
drawn afresh each round from the round's seed, so every member agrees without shared state.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from node0sim.protocol.averaging import Averager
from node0sim.protocol.tensors import Tensor, cat, orthonormalize, randn_like, zeros_like

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
    """One peer's PowerSGD state (error feedback) for one stage; the same code averages tensors or specs."""

    def __init__(self, shapes: list[tuple[int, ...]], rank: int):
        if rank < 1:
            raise ValueError(f"averaging.powersgd_rank must be >= 1 to compress, got {rank}")
        self.shapes = shapes
        self.rank = rank
        self.errors: dict[int, Tensor] = {}

    async def average(
        self, averager: Averager, tag: str, members: list[str], bandwidths: list[float],
        gradients: Tensor, samples: int, seed: int,
    ) -> tuple[Tensor | None, int]:
        """Sample-weighted mean of the group's gradients, low-rank compressed; (mean or None, contributors)."""
        weight = max(samples, 0)
        local = self._with_errors(gradients, weight)
        queries = self._queries(seed, gradients)
        phase1 = cat([
            (m @ queries[i]).reshape(-1) if i in queries else m.reshape(-1) for i, m in enumerate(local)
        ]) * weight
        mean1, contributors = await averager.all_reduce(f"{tag}/p", members, bandwidths, phase1, weight)
        if mean1 is None:
            return None, contributors
        factors, results = self._split_phase1(mean1, queries)
        phase2 = cat([local[i].T @ p for i, p in factors.items()]) * weight if factors else gradients[:0]
        mean2, _ = await averager.all_reduce(f"{tag}/q", members, bandwidths, phase2.reshape(-1), weight)
        offset = 0
        for i, p in factors.items():
            count = self.shapes[i][1] * self.rank
            q = mean2[offset:offset + count].view(self.shapes[i][1], self.rank)
            offset += count
            results[i] = p @ q.T
            self.errors[i] = local[i] - results[i]
        return cat([results[i].reshape(-1) for i in range(len(self.shapes))]), contributors

    def _with_errors(self, gradients: Tensor, weight: int) -> list[Tensor]:
        """This peer's mean gradient per tensor, plus its error feedback for compressed matrices."""
        tensors = list(gradients.split([math.prod(s) for s in self.shapes]))
        local = []
        for i, (flat, shape) in enumerate(zip(tensors, self.shapes)):
            mean = (flat / weight if weight else zeros_like(flat)).view(shape)
            local.append(mean + self.errors[i] if i in self.errors else mean)
        return local

    def _queries(self, seed: int, like: Tensor) -> dict[int, Tensor]:
        generator = torch.Generator().manual_seed(seed % 2**63)
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
