"""Staleness of asynchronous pipeline updates: the delay of each backward, and the weights its forward used.

A forward response carries the epoch of the server that computed it; the trainer echoes it in the backward
request, and the server measures the delay ``tau = current epoch - stamped epoch`` (updates between the
forward and its backward). With a :class:`WeightHistory` (numerics mode, ``train.delay_history`` > 0) it also
measures how far the weights moved (``|w_t - w_{t-tau}|``) and the cosine between that move and the last
update ``w_t - w_{t-1}`` (the look-ahead direction of Ajanthan et al., ICML 2025, Proposition 1), and can run
the backward with the forward's weights (weight stashing, PipeDream: Narayanan et al., SOSP 2019).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


class WeightHistory:
    """The flat parameter vectors of the last ``length`` epochs a stage server had (oldest dropped first)."""

    def __init__(self, length: int):
        if length < 1:
            raise ValueError(f"train.delay_history: must be >= 1 to keep weights, got {length}")
        self.length = length
        self._snapshots: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __contains__(self, epoch: int) -> bool:
        return epoch in self._snapshots

    def record(self, epoch: int, flat: torch.Tensor) -> None:
        """Keep ``flat`` as the weights of ``epoch`` (replacing an older snapshot of the same epoch)."""
        self._snapshots.pop(epoch, None)
        self._snapshots[epoch] = flat
        while len(self._snapshots) > self.length:
            self._snapshots.popitem(last=False)

    def get(self, epoch: int) -> torch.Tensor | None:
        """The weights of ``epoch``, or None if it was never recorded or has been dropped."""
        return self._snapshots.get(epoch)


MAX_COUNTED_DELAY = 1023
"""The delay histogram's last bucket: larger delays count there, so it stays bounded whatever epoch a server was told
(a forged DHT record's epoch of 2^62 made it grow to that many entries: MemoryError). Honest delays are a handful of
epochs: a backward's delay is counted between its forward and its backward on the same server."""


@dataclass
class StalenessStats:
    """Per server: backwards counted by delay, and the sums behind the mean weight gap and look-ahead cosine."""

    delay_counts: list[int] = field(default_factory=list)
    """``delay_counts[tau]``: backwards (tail calls included, whose delay is 0) that ran ``tau`` epochs after their forward."""
    weight_gap_sum: float = 0.0
    weight_gap_count: int = 0
    lookahead_cosine_sum: float = 0.0
    lookahead_cosine_count: int = 0

    def count_delay(self, tau: int) -> None:
        """One backward ran ``tau`` epochs after its forward (more than ``MAX_COUNTED_DELAY``: counted as that many)."""
        tau = min(tau, MAX_COUNTED_DELAY)
        if tau >= len(self.delay_counts):
            self.delay_counts.extend([0] * (tau + 1 - len(self.delay_counts)))
        self.delay_counts[tau] += 1

    def measure(self, current: torch.Tensor, forward: torch.Tensor, previous: torch.Tensor | None) -> None:
        """The weights now, at the forward, and one epoch ago (None: unknown): the gap and, if it is nonzero, the cosine."""
        gap = current - forward
        norm = float(gap.norm())
        self.weight_gap_sum += norm
        self.weight_gap_count += 1
        if previous is not None and norm > 0:
            self.lookahead_cosine_sum += float(torch.nn.functional.cosine_similarity(current - previous, gap, dim=0))
            self.lookahead_cosine_count += 1


def mean_delay(counts: list[int]) -> float | None:
    """Mean of a delay histogram (None when it is empty)."""
    total = sum(counts)
    return sum(tau * n for tau, n in enumerate(counts)) / total if total else None
