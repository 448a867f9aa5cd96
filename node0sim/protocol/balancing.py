"""Server-side load balancing: which stage a joining peer serves, and when a peer should move.

Petals-style "fill the weakest span" (Borzunov et al., 2023, "Distributed Inference and Fine-tuning
of Large Language Models Over The Internet", Sec. 3.2): a joining server takes the blocks with the
lowest total throughput, and servers periodically check whether moving would raise the swarm's
throughput enough. The pipeline's throughput is its bottleneck, the minimum over stages. A move
needs a relative gain of at least ``margin`` (hysteresis, cf. bigscience-workshop/petals#389 and
#493), so a balanced swarm never oscillates. Plain Python; no backend imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Relative tolerance for comparing sums of throughputs (absorbs float rounding): a stage left with
# at most this fraction of the leaving peer's throughput is empty, and values closer than this are equal.
_RTOL = 1e-9


def stage_throughputs(announced: Mapping[int, Mapping[str, float]], num_stages: int) -> list[float]:
    """Total announced throughput (samples/s) of each stage ``0..num_stages-1``; 0.0 for a stage with no peers."""
    totals = [0.0] * num_stages
    for stage, peers in announced.items():
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} out of range for {num_stages} stages")
        totals[stage] = float(sum(peers.values()))
    return totals


def _weakest(throughputs: Sequence[float], skip: int | None = None) -> int:
    """Index of the lowest throughput (ties to the lowest index), ignoring ``skip``."""
    candidates = [i for i in range(len(throughputs)) if i != skip]
    if not candidates:
        raise ValueError("no stage to choose from")
    return min(candidates, key=lambda i: (throughputs[i], i))


def choose_stage(throughputs: Sequence[float], own_throughput: float) -> int:
    """The stage a joining peer should serve: the bottleneck (lowest total throughput, ties to the lowest index).

    Adding ``own_throughput`` to the weakest stage raises the bottleneck the most, whatever its size;
    it must be positive.
    """
    if own_throughput <= 0:
        raise ValueError(f"own_throughput must be > 0, got {own_throughput}")
    return _weakest(throughputs)


def should_move(throughputs: Sequence[float], current: int, own_throughput: float, margin: float) -> int | None:
    """The stage this peer (now serving ``current`` at ``own_throughput``) should move to, or None to stay.

    The candidate move leaves ``current`` for the weakest other stage. Compare the stage throughputs
    sorted ascending, before and after the move, at the first position where they differ (the
    bottleneck first, then the next weakest stage, ...): move if the value there grows by at least
    the ``margin`` fraction. When the move changes the bottleneck this is exactly
    ``after >= before * (1 + margin)``; looking further handles ties between weakest stages (with
    stages at [8, 2, 2, 3] no single move raises the minimum, yet moving a peer from the first stage
    to a weak one is a step toward [4, 4, 4, 3]) and empty stages (0 * (1 + margin) is 0). Every
    move makes the sorted vector lexicographically larger, so moves cannot cycle and a balanced
    swarm never moves. The only peer of a stage (its own throughput is the whole stage's) never moves.
    """
    if not 0 <= current < len(throughputs):
        raise ValueError(f"current stage {current} out of range for {len(throughputs)} stages")
    if own_throughput <= 0:
        raise ValueError(f"own_throughput must be > 0, got {own_throughput}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if len(throughputs) < 2 or throughputs[current] - own_throughput <= _RTOL * own_throughput:
        return None
    moved = list(throughputs)
    moved[current] -= own_throughput
    target = _weakest(moved, skip=current)
    moved[target] += own_throughput
    for before, after in zip(sorted(throughputs), sorted(moved)):
        if abs(after - before) > _RTOL * max(abs(before), abs(after), own_throughput):
            return target if after > before and after >= before * (1 + margin) else None
    return None
