"""Server-side balancing: which stage a peer serves, and when it moves (with hysteresis)."""

import pytest

from node0sim.protocol.balancing import choose_stage, should_move, stage_throughputs


def _throughputs(layout: dict[str, int], speed: dict[str, float], num_stages: int) -> list[float]:
    announced: dict[int, dict[str, float]] = {}
    for peer, stage in layout.items():
        announced.setdefault(stage, {})[peer] = speed[peer]
    return stage_throughputs(announced, num_stages)


def _rebalance(layout: dict[str, int], speed: dict[str, float], num_stages: int, margin: float, rounds: int = 50):
    """Every peer in turn (by id) applies should_move to the current layout, until a round moves nobody.

    Returns the final layout and each peer's moves as (from, to) pairs.
    """
    layout = dict(layout)
    moves: dict[str, list[tuple[int, int]]] = {}
    for _ in range(rounds):
        moved = False
        for peer in sorted(layout):
            target = should_move(_throughputs(layout, speed, num_stages), layout[peer], speed[peer], margin)
            if target is not None:
                moves.setdefault(peer, []).append((layout[peer], target))
                layout[peer] = target
                moved = True
        if not moved:
            return layout, moves
    raise AssertionError(f"no convergence in {rounds} rounds: {moves}")


def test_stage_throughputs_sums_and_fills_empty_stages():
    assert stage_throughputs({0: {"a": 1.0, "b": 2.5}, 2: {"c": 4.0}}, 4) == [3.5, 0.0, 4.0, 0.0]
    assert stage_throughputs({}, 2) == [0.0, 0.0]
    with pytest.raises(ValueError):
        stage_throughputs({3: {"a": 1.0}}, 3)


def test_joiner_fills_an_empty_stage_first():
    assert choose_stage([5.0, 0.0, 2.0, 0.0], own_throughput=1.0) == 1


def test_joiner_picks_least_throughput_not_fewest_peers():
    # Stage 0: two slow peers (1 + 1); stage 1: one fast peer (5); stage 2: three peers (1 + 1 + 2).
    t = stage_throughputs({0: {"a": 1.0, "b": 1.0}, 1: {"c": 5.0}, 2: {"d": 1.0, "e": 1.0, "f": 2.0}}, 3)
    assert choose_stage(t, own_throughput=1.0) == 0
    assert choose_stage([2.0, 2.0, 3.0], own_throughput=1.0) == 0  # ties to the lowest index
    with pytest.raises(ValueError):
        choose_stage([1.0], own_throughput=0.0)


def test_joiners_fill_a_swarm_evenly():
    layout: dict[str, int] = {}
    speed = {f"p{i}": 1.0 for i in range(12)}
    for peer in sorted(speed, key=lambda p: int(p[1:])):
        layout[peer] = choose_stage(_throughputs(layout, speed, 4), speed[peer])
    assert _throughputs(layout, speed, 4) == [3.0, 3.0, 3.0, 3.0]


def test_moves_from_over_provisioned_to_empty_stage():
    assert should_move([4.0, 1.0, 0.0], current=0, own_throughput=1.0, margin=0.1) == 2


def test_moves_from_over_provisioned_to_starved_stage():
    assert should_move([6.0, 1.0, 3.0], current=0, own_throughput=1.0, margin=0.1) == 1
    # The gain must clear the margin: 2 -> 2.5 is +25%.
    assert should_move([6.0, 2.0, 3.0], current=0, own_throughput=0.5, margin=0.2) == 1
    assert should_move([6.0, 2.0, 3.0], current=0, own_throughput=0.5, margin=0.3) is None


def test_does_not_move_when_it_would_not_help():
    # Leaving stage 0 would make it the new, lower bottleneck.
    assert should_move([3.0, 2.0], current=0, own_throughput=2.0, margin=0.0) is None
    # The weakest stage's own peers stay.
    assert should_move([2.0, 6.0], current=0, own_throughput=1.0, margin=0.1) is None


def test_only_peer_of_a_stage_never_moves():
    assert should_move([1.0, 0.0, 0.0], current=0, own_throughput=1.0, margin=0.0) is None
    assert should_move([10.0, 1.0], current=0, own_throughput=10.0, margin=0.0) is None
    # Float sums that are not exactly the peer's throughput still count as "only peer".
    assert should_move([0.1 + 0.2 - 0.2, 0.0], current=0, own_throughput=0.1, margin=0.0) is None


def test_balanced_swarm_never_moves():
    speed = {f"s{s}p{i}": 1.0 for s in range(4) for i in range(4)}
    layout = {peer: int(peer[1]) for peer in speed}
    final, moves = _rebalance(layout, speed, 4, margin=0.1)
    assert moves == {} and final == layout


def test_tied_bottlenecks_still_rebalance():
    # [8, 2, 2, 3]: no single move raises the minimum, but the swarm still reaches [4, 4, 4, 3].
    speed = {f"p{i}": 1.0 for i in range(12)} | {"big": 3.0}
    layout = {f"p{i}": 0 for i in range(8)} | {"p8": 1, "p9": 1, "p10": 2, "p11": 2, "big": 3}
    final, moves = _rebalance(layout, speed, 4, margin=0.1)
    assert sorted(_throughputs(final, speed, 4)) == [3.0, 4.0, 4.0, 4.0]
    assert all(len(m) == 1 for m in moves.values())


def test_unbalanced_swarm_converges_without_oscillation():
    speed = {f"p{i}": 1.0 for i in range(10)} | {"fast": 2.0, "faster": 3.0}
    layout = {f"p{i}": 0 for i in range(8)} | {"p8": 1, "p9": 1, "fast": 2, "faster": 0}
    final, moves = _rebalance(layout, speed, num_stages=5, margin=0.1)
    assert moves, "the layout was unbalanced"
    assert all(len(m) == 1 for m in moves.values()), moves  # no peer moves twice, so none moves back
    t = _throughputs(final, speed, 5)
    assert t == [3.0] * 5  # 15 samples/s spread evenly over 5 stages
    for peer, stage in final.items():  # and it is stable
        assert should_move(t, stage, speed[peer], margin=0.1) is None


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        should_move([1.0, 1.0], current=2, own_throughput=1.0, margin=0.1)
    with pytest.raises(ValueError):
        should_move([1.0, 1.0], current=0, own_throughput=0.0, margin=0.1)
    with pytest.raises(ValueError):
        should_move([1.0, 1.0], current=0, own_throughput=1.0, margin=-0.1)
    assert should_move([5.0], current=0, own_throughput=1.0, margin=0.0) is None  # nowhere to go
