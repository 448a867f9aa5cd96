"""Trainer-side routing: SWARM's expected-finish-time balancer."""

import random
from collections import Counter

import pytest

from node0sim.protocol.routing import Router


def _router(**kw) -> Router:
    return Router(random.Random(0), **kw)


def test_requests_split_in_proportion_to_throughput():
    r = _router()
    r.update_peers(0, {"fast": 3.0, "slow": 1.0})
    counts = Counter(r.choose(0, samples=1, now=0.0) for _ in range(400))
    assert counts["fast"] / 400 == pytest.approx(0.75, abs=0.02)


def test_backward_costs_more_than_forward():
    r = _router(backward_weight=2.5)
    r.update_peers(0, {"a": 1.0, "b": 1.0})
    first = r.choose(0, samples=2, now=0.0, backward=True)
    assert r.state(0, first).busy_until == pytest.approx(5.0)
    # A 2-sample backward costs as much as 5 samples forward: the other peer takes three 2-sample
    # forwards (finishing at 2, 4, 6 s) before the first one (free at 5 s, finishing at 7 s) wins again.
    other = r.choose(0, samples=2, now=0.0)
    assert other != first
    assert [r.choose(0, samples=2, now=0.0) for _ in range(3)] == [other, other, first]


def test_ties_are_deterministic_for_a_seed():
    picks = []
    for _ in range(2):
        r = _router()
        r.update_peers(0, {f"p{i}": 1.0 for i in range(8)})
        picks.append([r.choose(0, samples=1, now=0.0) for _ in range(8)])
    assert picks[0] == picks[1]
    assert sorted(picks[0]) == [f"p{i}" for i in range(8)]  # every idle peer used once before any repeats


def test_failed_peer_is_banned_until_the_ban_expires():
    r = _router(ban_s=60.0)
    r.update_peers(0, {"fast": 3.0, "slow": 1.0})
    r.report_failure(0, "fast", now=10.0)
    assert r.available(0, now=10.0) == ["slow"]
    assert {r.choose(0, samples=1, now=t) for t in (10.0, 30.0, 69.9)} == {"slow"}
    assert r.available(0, now=70.0) == ["fast", "slow"]
    assert r.choose(0, samples=1, now=70.0) == "fast"


def test_failure_resets_the_queue():
    r = _router()
    r.update_peers(0, {"a": 1.0})
    for _ in range(5):
        r.choose(0, samples=1, now=0.0)
    r.report_failure(0, "a", now=1.0)
    assert r.state(0, "a").busy_until == 1.0


def test_exclude_routes_a_retry_elsewhere():
    r = _router()
    r.update_peers(0, {"fast": 3.0, "slow": 1.0})
    assert r.choose(0, samples=1, now=0.0, exclude={"fast"}) == "slow"
    assert r.choose(0, samples=1, now=0.0, exclude=["fast", "slow"]) is None


def test_none_when_all_banned_or_no_peers():
    r = _router()
    assert r.choose(0, samples=1, now=0.0) is None
    r.update_peers(0, {"a": 1.0, "b": 2.0})
    r.report_failure(0, "a", now=0.0)
    r.report_failure(0, "b", now=0.0)
    assert r.choose(0, samples=1, now=1.0) is None
    assert r.available(0, now=1.0) == []


def test_ema_moves_toward_observed_throughput():
    r = _router(ema_alpha=0.2)
    r.update_peers(0, {"a": 10.0})
    r.report_success(0, "a", samples=4, elapsed_s=2.0, now=2.0)  # observed 2 samples/s
    assert r.state(0, "a").throughput == pytest.approx(10.0 + 0.2 * (2.0 - 10.0))
    for _ in range(50):
        r.report_success(0, "a", samples=4, elapsed_s=2.0, now=2.0)
    assert r.state(0, "a").throughput == pytest.approx(2.0, rel=1e-3)
    # A backward of 4 samples in 5 s is 2 forward-samples/s at weight 2.5.
    r.report_success(0, "a", samples=4, elapsed_s=5.0, now=7.0, backward=True)
    assert r.state(0, "a").throughput == pytest.approx(2.0, rel=1e-3)


def test_early_finish_pulls_busy_until_back():
    r = _router()
    r.update_peers(0, {"a": 1.0})
    r.choose(0, samples=4, now=0.0)  # predicted busy until 4 s
    r.report_success(0, "a", samples=4, elapsed_s=1.0, now=1.0)
    assert r.state(0, "a").busy_until == 1.0
    # With two requests queued, finishing the first 3 s early shortens the queue by 3 s.
    r.choose(0, samples=2, now=1.0)
    r.choose(0, samples=2, now=1.0)
    before = r.state(0, "a").busy_until
    speed = r.state(0, "a").throughput
    r.report_success(0, "a", samples=2, elapsed_s=0.5, now=1.5)
    assert r.state(0, "a").busy_until == pytest.approx(max(1.5, before - (2 / speed - 0.5)))
    # A late finish leaves the prediction alone.
    r.update_peers(1, {"b": 1.0})
    r.choose(1, samples=1, now=0.0)
    r.report_success(1, "b", samples=1, elapsed_s=3.0, now=3.0)
    assert r.state(1, "b").busy_until == 1.0


def test_update_peers_keeps_learned_state_and_forgets_departed():
    r = _router()
    r.update_peers(0, {"a": 10.0, "b": 1.0})
    r.report_success(0, "a", samples=2, elapsed_s=1.0, now=1.0)
    learned = r.state(0, "a").throughput
    r.report_failure(0, "b", now=1.0)
    r.update_peers(0, {"a": 99.0, "c": 5.0, "d": 0.0})
    assert r.peers(0) == ["a", "c", "d"]
    assert r.state(0, "a").throughput == learned
    assert r.state(0, "c").throughput == 5.0
    assert r.state(0, "d").throughput == r.default_throughput  # no usable announcement
    with pytest.raises(KeyError):
        r.state(0, "b")
    r.report_success(0, "b", samples=1, elapsed_s=1.0, now=2.0)  # late reports about forgotten peers are ignored
    r.report_failure(0, "b", now=2.0)
    assert r.peers(0) == ["a", "c", "d"]
    assert r.peers(1) == []


def test_stages_are_independent():
    r = _router()
    r.update_peers(0, {"a": 1.0})
    r.update_peers(1, {"b": 1.0})
    assert r.choose(0, samples=1, now=0.0) == "a"
    assert r.choose(1, samples=1, now=0.0) == "b"
    assert r.peers(0) == ["a"] and r.peers(1) == ["b"]


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        _router(ema_alpha=0.0)
    with pytest.raises(ValueError):
        _router(backward_weight=0.0)
    with pytest.raises(ValueError):
        _router(default_throughput=-1.0)
    with pytest.raises(ValueError):
        _router(ban_s=-1.0)
    with pytest.raises(ValueError, match="max_ban_s must be >= ban_s"):
        _router(ban_s=10.0, max_ban_s=5.0)


def test_choose_matches_the_least_finish_rank_peer_key():
    """choose() picks min((max(now, busy_until) + cost / throughput, tie_rank, peer)), ties included."""
    import random as _random

    rng = _random.Random(7)
    for trial in range(200):
        router = Router(_random.Random(trial))
        peers = {f"p{i}": rng.choice([1.0, 2.0, 4.0]) for i in range(rng.randint(1, 8))}
        router.update_peers(0, peers)
        for peer in peers:  # coarse values so that finish times and ranks tie often
            st = router.state(0, peer)
            st.busy_until = rng.choice([0.0, 1.0, 2.0])
            st.tie_rank = rng.choice([0.25, 0.5])
            st.banned_until = rng.choice([0.0, 0.0, 5.0])
        now, exclude = 1.0, set(rng.sample(sorted(peers), rng.randint(0, min(2, len(peers)))))
        keys = [
            (max(now, st.busy_until) + 2.5 / st.throughput, st.tie_rank, p)
            for p, st in ((p, router.state(0, p)) for p in peers)
            if st.banned_until <= now and p not in exclude
        ]
        expected = min(keys) if keys else None
        assert router.choose(0, 1, now, backward=True, exclude=exclude) == (expected[2] if expected else None)
        if expected:
            assert router.state(0, expected[2]).busy_until == expected[0]


def test_bans_double_with_each_failure_in_a_row_up_to_the_cap_and_a_success_resets_them():
    r = _router(ban_s=10.0, max_ban_s=35.0)
    r.update_peers(0, {"a": 1.0, "b": 1.0})
    ends = []
    for now in (0.0, 100.0, 200.0, 300.0):
        r.report_failure(0, "a", now=now)
        ends.append(r.state(0, "a").banned_until - now)
    assert ends == [10.0, 20.0, 35.0, 35.0]
    r.report_success(0, "a", samples=1, elapsed_s=1.0, now=400.0)
    r.report_failure(0, "a", now=500.0)
    assert r.state(0, "a").banned_until == 510.0


def test_without_a_cap_every_ban_lasts_ban_s():
    r = _router(ban_s=10.0)
    r.update_peers(0, {"a": 1.0})
    for now in (0.0, 50.0):
        r.report_failure(0, "a", now=now)
    assert r.state(0, "a").banned_until == 60.0


def test_a_failure_moves_the_throughput_estimate_toward_zero_by_one_ema_step():
    r = _router(ema_alpha=0.2)
    r.update_peers(0, {"a": 10.0, "b": 9.0})
    assert r.choose(0, samples=1, now=0.0) == "a"
    r.report_failure(0, "a", now=0.0)
    assert r.state(0, "a").throughput == pytest.approx(10.0 * (1 - 0.2))
    # once the ban is over, b (9 samples/s) is now expected to finish first
    assert r.choose(0, samples=1, now=1000.0) == "b"


def test_a_peer_outpaced_by_a_hedge_is_not_banned_and_its_estimate_falls_toward_the_rate_its_wait_implies():
    r = _router(ema_alpha=0.2, backward_weight=2.5)
    r.update_peers(0, {"a": 10.0})
    r.report_outpaced(0, "a", samples=4, elapsed_s=2.0, backward=True)  # at most 4 x 2.5 / 2 = 5 samples/s
    state = r.state(0, "a")
    assert state.throughput == pytest.approx(10.0 + 0.2 * (5.0 - 10.0))
    assert state.banned_until == 0.0 and state.failures == 0
    r.report_outpaced(0, "a", samples=4, elapsed_s=0.1)  # a bound above the estimate says nothing
    assert state.throughput == pytest.approx(9.0)


def test_a_banned_peer_that_reannounces_stays_banned_with_its_estimate():
    r = _router(ban_s=60.0, max_ban_s=960.0)
    r.update_peers(0, {"liar": 1e12, "honest": 1.0})
    r.report_failure(0, "liar", now=10.0)
    r.update_peers(0, {"honest": 1.0})  # it withdraws its record...
    r.update_peers(0, {"liar": 1e12, "honest": 1.0})  # ...and announces itself again
    assert r.available(0, now=20.0) == ["honest"]
    assert r.state(0, "liar").failures == 1 and r.state(0, "liar").throughput == pytest.approx(0.8e12)
    r.report_failure(0, "liar", now=80.0)
    assert r.state(0, "liar").banned_until == 80.0 + 120.0  # its second failure in a row: the ban doubled


def test_with_require_proof_a_new_peer_gets_work_only_once_proven():
    r = Router(random.Random(0), require_proof=True)
    r.update_peers(0, {"a": 1e12, "b": 1.0})
    assert r.choose(0, samples=4, now=0.0) is None and r.proven_peers(0) == [] and r.unproven(0, now=0.0) == ["a", "b"]
    r.prove(0, "b")
    assert r.choose(0, samples=4, now=0.0) == "b" and r.proven_peers(0) == ["b"]
    r.report_failure(0, "a", now=0.0)  # its probe failed: banned, and not probed again until the ban is over
    assert r.unproven(0, now=1.0) == [] and r.unproven(0, now=61.0) == ["a"]
    r.update_peers(0, {"b": 1.0, "c": 5.0})  # a later joiner must prove itself too; a proven peer stays proven
    assert r.unproven(0, now=61.0) == ["c"] and r.proven_peers(0) == ["b"]
    assert Router(random.Random(0)).proven_peers(0) == [] and _router().require_proof is False


def test_a_peer_that_never_failed_is_forgotten_when_it_leaves():
    r = _router()
    r.update_peers(0, {"a": 5.0})
    r.report_success(0, "a", samples=10, elapsed_s=1.0, now=1.0)
    r.update_peers(0, {})
    r.update_peers(0, {"a": 5.0})
    assert r.state(0, "a").throughput == 5.0
