"""Robust averaging in the protocol's all-reduce (``GroupAverager``, ``bound_contributions``; issue 14, item 2): declared
weights bounded by the group's median, parts clipped to the median distance from the coordinate-wise median
(``averaging.max_distance_ratio``),
non-finite parts refused with their sender left out, and a round with nothing usable counted as failed, never as
averaged. Virtual time on the simulator; the poisoning scenario also on live peers (slow)."""

import math

import pytest
import torch

from node0sim.protocol.averaging import (
    AveragingConfig,
    GroupAverager,
    ReducePart,
    bound_contributions,
    lower_median,
    part_bounds,
)
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.messages import REDUCE_PART
from node0sim.protocol.stage_compute import CostStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.tensors import TensorSpec
from node0sim.runtime import RemoteError
from tests.backends import run_scenario
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG

POISON_WEIGHT = 1e6
POISON_VALUE = 0.5  # what the issue's poisoning member set the honest peers' parameters to


class _SkipsTheOwnVectorRule(GroupAverager):
    """A faulty member: sends its non-finite vector (and so a non-finite averaged part) instead of taking part with zeros."""

    all_reduce = GroupAverager._all_reduce


def _round(backend, vectors, weights, cfg, bandwidths=None, faulty=()):
    """One all-reduce of ``vectors`` (weighted sums) and ``weights`` by name: ``{name: (mean, contributors, averager)}`` and
    each member's part ``(start, end)`` by name; ``bandwidths`` by name (1 each unless given), ``faulty`` members skip the
    own-vector rule."""
    names = sorted(vectors)

    async def scenario(runtimes):
        averagers = {n: (_SkipsTheOwnVectorRule if n in faulty else GroupAverager)(runtimes[n], 0, cfg) for n in names}
        for averager in averagers.values():
            averager.serve()
        name_of = {runtimes[n].peer_id: n for n in names}
        members = sorted(name_of)
        shares = [(bandwidths or {}).get(name_of[m], 1.0) for m in members]
        tasks = [runtimes[n].spawn(averagers[n].all_reduce("r", members, shares, vectors[n], weights[n])) for n in names]
        results = await runtimes[names[0]].gather(tasks)
        bounds = part_bounds(next(iter(vectors.values())).numel(), cfg.part_shares(shares))
        return ({n: (*result, averagers[n]) for n, result in zip(names, results)},
                {name_of[m]: bound for m, bound in zip(members, bounds)})

    return run_scenario(backend, names, scenario)


def _parameters(seed: int, n: int = 3000) -> torch.Tensor:
    """Parameter-like values (the scale of a small model's initialization)."""
    return 0.02 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _poisoned_parameter_round(backend, cfg):
    """The issue's attack on a parameter averaging round (weight 1 each): member c declares weight 1e6 with every value
    0.5. c owns no part (bandwidth 0): what a member writes into its own part is not checked (README)."""
    honest = {"a": _parameters(1), "b": _parameters(1) + 0.001 * torch.randn(3000, generator=torch.Generator().manual_seed(2))}
    vectors = {**honest, "c": torch.full((3000,), POISON_VALUE * POISON_WEIGHT)}
    outcome, parts = _round(backend, vectors, {"a": 1.0, "b": 1.0, "c": POISON_WEIGHT}, cfg, bandwidths={"c": 0.0})
    return honest, vectors, outcome, parts


def _centered_clipping(per_sample: list[torch.Tensor], max_distance_ratio: float) -> list[torch.Tensor]:
    """The distance bound's formula: each ``x_i`` clipped to ``R = max_distance_ratio x lower_median(|x_i - c|)`` around the
    coordinate-wise median ``c``."""
    center = torch.stack(per_sample).median(dim=0).values
    distances = [float((x - center).norm()) for x in per_sample]
    radius = max_distance_ratio * lower_median(distances)
    return [x if d <= radius else center + (x - center) * (radius / d) for x, d in zip(per_sample, distances)]


def _poisoning_bounded_by_the_rule(backend):
    cfg = AveragingConfig(8, max_distance_ratio=4.0)
    honest, vectors, outcome, parts = _poisoned_parameter_round(backend, cfg)
    weight_bound = cfg.max_weight_ratio * lower_median([1.0, 1.0, POISON_WEIGHT])  # 16
    share = weight_bound / (2 + weight_bound)  # the liar's share of the weight after the bound: 16 / 18
    for name in "ab":
        mean, contributors, averager = outcome[name]
        assert contributors == 3 and averager.clipped_parts == 1 and averager.refused_parts == 0
        for owner in "ab":
            start, end = parts[owner]
            a, b, poison = (v[start:end] for v in (honest["a"], honest["b"], vectors["c"] / POISON_WEIGHT))
            a_kept, b_kept, clipped = _centered_clipping([a, b, poison], cfg.max_distance_ratio)
            assert a_kept is a and b_kept is b
            torch.testing.assert_close(mean[start:end], (a + b + weight_bound * clipped) / (2 + weight_bound))
            # the honest members' result moved by at most share x |clipped liar - honest mean| <= share x (|c - m_H| + R)
            honest_mean = (a + b) / 2
            center = torch.stack([a, b, poison]).median(dim=0).values
            radius = float((clipped - center).norm())
            bound = share * (float((center - honest_mean).norm()) + radius)
            assert float((mean[start:end] - honest_mean).norm()) <= bound * (1 + 1e-5)


def test_a_poisoning_member_with_weight_1e6_moves_the_honest_result_by_at_most_the_rules_bound():
    _poisoning_bounded_by_the_rule("sim")


@pytest.mark.slow
def test_a_poisoning_member_with_weight_1e6_moves_the_honest_result_by_at_most_the_rules_bound_on_live_peers():
    _poisoning_bounded_by_the_rule("swarm")


def test_with_the_defaults_the_poisoning_members_weight_is_bounded_and_without_a_bound_it_takes_the_mean_over():
    defaults = AveragingConfig(8)
    honest, _, outcome, _ = _poisoned_parameter_round("sim", defaults)
    honest_mean = (honest["a"] + honest["b"]) / 2
    weight_bound = defaults.max_weight_ratio * 1.0  # 16 x the lower median of (1, 1, 1e6)
    for name in "ab":
        mean, _, averager = outcome[name]
        # its per-sample values (0.5) are kept, at weight 16 instead of 1e6: the mean moves 16/18 of the way to them
        torch.testing.assert_close(mean, honest_mean + weight_bound / (2 + weight_bound) * (POISON_VALUE - honest_mean))
        assert averager.clipped_parts == 1
    unbounded, _, outcome, _ = _poisoned_parameter_round("sim", AveragingConfig(8, max_weight_ratio=0.0))
    for name in "ab":  # what the issue measured: the honest members' values set to 0.5
        torch.testing.assert_close(outcome[name][0], torch.full((3000,), POISON_VALUE), atol=1e-5, rtol=0)


def test_a_members_non_finite_parts_are_refused_and_the_honest_members_average_among_themselves():
    vectors = {"a": torch.full((6000,), 2.0), "b": torch.full((6000,), 4.0), "c": torch.full((6000,), float("nan"))}
    outcome, parts = _round("sim", vectors, {"a": 1.0, "b": 1.0, "c": 1.0}, AveragingConfig(8, averaging_timeout_s=4.0), faulty=("c",))
    for name in "ab":
        mean, contributors, averager = outcome[name]
        # c's contribution and c's averaged part (non-finite) refused: c is left out, and not waited for
        assert contributors == 2 and averager.timeouts == 0 and averager.refused_parts == 2
        expected = torch.full((6000,), 3.0)
        start, end = parts["c"]
        expected[start:end] = vectors[name][start:end]  # c's part keeps this member's own values, as if c had vanished
        assert torch.equal(mean, expected)
    assert outcome["c"][0] is None


def test_with_only_a_liar_beside_it_a_member_gets_nothing_but_its_own_values():
    vectors = {"a": torch.full((1000,), 2.0), "c": torch.full((1000,), float("nan"))}
    outcome, _ = _round("sim", vectors, {"a": 2.0, "c": 1.0}, AveragingConfig(8), faulty=("c",))
    mean, contributors, averager = outcome["a"]
    assert contributors == 1 and averager.timeouts == 0 and torch.equal(mean, torch.full((1000,), 1.0))
    # the stage server counts such a round as failed, never as averaged (test_a_round_with_nothing_usable_...)


def test_a_part_far_from_the_others_is_clipped_to_tau_times_the_median_distance():
    cfg = AveragingConfig(8, max_distance_ratio=4.0)
    vectors = {"a": _parameters(1), "b": _parameters(2), "c": torch.full((3000,), 1e3)}
    outcome, parts = _round("sim", vectors, {"a": 1.0, "b": 1.0, "c": 1.0}, cfg, bandwidths={"c": 0.0})
    for name in "ab":
        mean, contributors, averager = outcome[name]
        assert contributors == 3 and averager.clipped_parts == 1
        for owner in "ab":
            start, end = parts[owner]
            a, b, huge = (vectors[n][start:end] for n in "abc")
            center = torch.stack([a, b, huge]).median(dim=0).values
            distances = [float((x - center).norm()) for x in (a, b, huge)]
            radius = cfg.max_distance_ratio * lower_median(distances)
            assert max(distances[:2]) <= radius < distances[2]  # only c is clipped, to the radius
            clipped = center + (huge - center) * (radius / distances[2])
            assert math.isclose(float((clipped - center).norm()), radius, rel_tol=1e-5)
            torch.testing.assert_close(mean[start:end], (a + b + clipped) / 3)


@pytest.mark.parametrize("max_distance_ratio", [0.0, 4.0])
def test_an_honest_round_gives_exactly_the_plain_weighted_mean(max_distance_ratio):
    # integer-valued sums, so the mean does not depend on the order parts are added in
    base = torch.arange(1000.0) % 7 + 100
    sums = {"a": 2 * base, "b": 3 * (base + 1), "c": 5 * (base - 2)}
    weights = {"a": 2.0, "b": 3.0, "c": 5.0}
    cfg = AveragingConfig(8, max_distance_ratio=max_distance_ratio)
    outcome, _ = _round("sim", sums, weights, cfg, bandwidths={"a": 10.0, "b": 20.0, "c": 30.0})
    for mean, contributors, averager in outcome.values():
        assert contributors == 3 and averager.clipped_parts == 0 and averager.refused_parts == 0
        assert torch.equal(mean, (sums["a"] + sums["b"] + sums["c"]) / 10.0)


# ---- the rule itself ---------------------------------------------------------------------------------------

def test_of_two_members_each_weight_is_bounded_by_the_other_and_no_distance_is_clipped():
    cfg = AveragingConfig(8, max_distance_ratio=4.0)
    small, large = torch.ones(10), torch.full((10,), 100.0)
    (first, second), clipped = bound_contributions([(small, 1.0), (large * 100.0, 100.0)], cfg)
    assert first[0] is small and first[1] == 1.0 and clipped == 1
    # weight 16 x 1 = 16, its per-sample values (100) kept: a median of two cannot tell who lies
    assert second[1] == 16.0
    torch.testing.assert_close(second[0], torch.full((10,), 16.0 * 100.0))


def test_of_three_members_the_distance_bound_is_centered_clipping_around_the_coordinate_wise_median():
    cfg = AveragingConfig(8, max_weight_ratio=0.0, max_distance_ratio=2.0)
    x = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 30.0])]
    bounded, clipped = bound_contributions([(v * 2.0, 2.0) for v in x], cfg)
    # center (0, 0); distances 0, 1, 30; radius 2 x 1: the third is clipped to (0, 2)
    assert clipped == 1 and [w for _, w in bounded] == [2.0, 2.0, 2.0]
    torch.testing.assert_close(bounded[2][0], torch.tensor([0.0, 2.0]) * 2.0)


def test_a_part_of_weight_0_adds_nothing_and_parts_within_the_bounds_come_back_as_they_came():
    cfg = AveragingConfig(8, max_distance_ratio=4.0)
    parts = [(torch.ones(5), 1.0), (torch.full((5,), 1e9), 0.0), (torch.full((5,), 2.0), 2.0)]
    bounded, clipped = bound_contributions(parts, cfg)
    assert bounded[0][0] is parts[0][0] and bounded[2][0] is parts[2][0] and clipped == 0
    assert torch.equal(bounded[1][0], torch.zeros(5)) and bounded[1][1] == 0.0


def test_in_timing_mode_weights_are_bounded_and_norms_are_not_measured():
    spec = TensorSpec((100,), torch.float32)
    bounded, clipped = bound_contributions([(spec, 1.0), (spec, 1.0), (spec, 1e6)], AveragingConfig(8, max_distance_ratio=4.0))
    assert [w for _, w in bounded] == [1.0, 1.0, 16.0] and clipped == 1 and all(v == spec for v, _ in bounded)


@pytest.mark.parametrize("key", ["max_weight_ratio", "max_distance_ratio"])
@pytest.mark.parametrize("value", [0.5, -1.0, math.inf, math.nan])
def test_a_bound_below_1_or_not_finite_is_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"averaging.{key}: must be 0 .* got {value}"):
        AveragingConfig(8, **{key: value})


def test_a_part_of_negative_weight_is_refused_by_name():
    sim = make_sim(latency_s=0.01)
    member, sender = add(sim, "a").runtime, add(sim, "x").runtime
    averager = GroupAverager(member, 0, AveragingConfig(8))
    averager.serve()

    async def send():
        with pytest.raises(RemoteError, match=r"has weight -1.0 \(must be finite and >= 0\)"):
            await sender.call("a", REDUCE_PART, ReducePart(0, "grad/1", torch.ones(4), -1.0), 10)

    task = sender.spawn(send())
    sim.run(until=task.process)
    assert averager.refused_parts == 1


# ---- what the stage server counts (stage_server.py: _end_epoch, _watch_round) --------------------------------

class _OnlyOwnValues(GroupAverager):
    """Every other member's parts refused, none late: the result is this peer's own values (contributors 1)."""

    async def all_reduce(self, tag, members, bandwidths, vector, weight):
        return vector / weight, 1


class _NoUsableMean(GroupAverager):
    """What the issue saw: no mean, while the parts of all 3 members arrived."""

    async def all_reduce(self, tag, members, bandwidths, vector, weight):
        return None, 3


def _stage_of_two(averager, seconds: float = 30.0, feed_s: float = math.inf) -> list[StageServer]:
    """Two timing-mode servers of one stage, fed 4 samples each per second for ``feed_s`` of the ``seconds``."""
    sim = make_sim(latency_s=0.01)
    servers = []
    for name in ("a", "b"):
        rt = add(sim, name).runtime
        compute = CostStageCompute(CFG, 1, 2, range(2, 4), DenseCodec(), torch.float32)
        servers.append(StageServer(rt, "run", compute, AveragingConfig(8), throughput=1.0, bandwidth_mbps=50, averager=averager))
        rt.spawn(servers[-1].start())

    async def feed(rt):
        while rt.now() < feed_s:
            await rt.sleep(1.0)
            for server in servers:
                server.progress.count(4)

    servers[0].rt.spawn(feed(servers[0].rt))
    sim.run(until=seconds)
    return servers


@pytest.mark.parametrize("averager,steps", [(_OnlyOwnValues, True), (_NoUsableMean, False)])
def test_a_round_with_nothing_usable_from_the_group_counts_as_failed_never_as_averaged(averager, steps):
    for server in _stage_of_two(averager):
        stats = server.stats
        assert stats.epochs > 5 and stats.averaging_rounds == 0 and stats.state_averaging_rounds == 0
        # a solo step with its own gradients, or no step at all (no mean)
        assert stats.solo_steps == (stats.epochs if steps else 0)
        # every gradient round failed, and every state round (each average_state_every = 5 epochs) too
        assert stats.failed_rounds == stats.failed_rounds_in_a_row == stats.epochs + stats.epochs // 5


def test_an_honest_stage_counts_no_failed_rounds():
    for server in _stage_of_two(GroupAverager):
        stats = server.stats
        assert stats.averaging_rounds == stats.epochs > 5 and stats.failed_rounds == 0


def test_no_epoch_ends_after_the_feed_stops_and_an_empty_round_is_neither_failed_nor_averaged():
    # a server's last report of a round announced the next epoch as being averaged, so its partner ended that one at
    # once, and so on: 19 epochs in 25 s where 80 samples at a target of 8 make 10 (38 empty rounds in 50 idle seconds)
    servers = _stage_of_two(GroupAverager, seconds=60.0, feed_s=10.0)
    for server in servers:
        stats = server.stats
        assert stats.failed_rounds == 0 and stats.solo_steps == 0
        assert stats.epochs == stats.averaging_rounds <= 10
    # a round in which nobody had samples (no mean, no timeout) leaves the counts as they are: neither a failure (the
    # watchdog would exit idle peers) nor an averaging round (a live test once passed on such rounds counted as averaged)
    server = servers[0]
    before = (server.stats.failed_rounds, server.stats.failed_rounds_in_a_row, server.stats.averaging_rounds)
    server._watch_round(None, 2, 2, server.averager.timeouts, had_samples=False)
    assert (server.stats.failed_rounds, server.stats.failed_rounds_in_a_row, server.stats.averaging_rounds) == before
    server._watch_round(None, 2, 2, server.averager.timeouts, had_samples=True)
    assert server.stats.failed_rounds == before[0] + 1
