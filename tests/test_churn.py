"""Churn models: event schedules of the none, poisson, volunteer and trace models."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from node0sim.config import build_section
from node0sim.sim.churn import ChurnConfig, ChurnEvent, churn_schedule, load_trace

PEERS = [f"p{i}" for i in range(2000)]
FOREVER = 1e12  # a horizon no session reaches


def schedule(horizon_s: float = FOREVER, peers: list[str] = PEERS, seed: int = 0, **kwargs) -> list[ChurnEvent]:
    return churn_schedule(ChurnConfig(**kwargs), peers, horizon_s, random.Random(seed))


def check_well_formed(events: list[ChurnEvent], peers: list[str], horizon_s: float) -> None:
    """Sorted, inside the horizon, and every peer's history is: (join) then at most one departure."""
    assert events == sorted(events, key=lambda e: (e.time, e.peer, e.action))
    assert all(0 <= e.time < horizon_s for e in events)
    present, gone = set(peers), set()
    for e in events:
        if e.action == "join":
            assert e.peer not in present and e.peer not in gone
            present.add(e.peer)
        else:
            assert e.peer in present, e
            present.remove(e.peer)
            gone.add(e.peer)


def write_trace(tmp_path: Path, text: str) -> str:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return str(path)


def test_none_gives_no_events() -> None:
    assert schedule(name="none") == []


def test_poisson_initial_peers_depart_once_with_exponential_sessions() -> None:
    events = schedule(name="poisson", mean_session_s=1000.0, crash_fraction=0.3)
    check_well_formed(events, PEERS, FOREVER)
    assert sorted(e.peer for e in events) == sorted(PEERS)
    # exponential(1000) over 2000 peers: the sample mean has a standard deviation of ~22 s
    assert statistics.fmean(e.time for e in events) == pytest.approx(1000.0, rel=0.1)
    assert sum(e.action == "crash" for e in events) / len(events) == pytest.approx(0.3, abs=0.05)


def test_poisson_horizon_cuts_departures() -> None:
    events = schedule(horizon_s=1000.0, name="poisson", mean_session_s=1000.0)
    check_well_formed(events, PEERS, 1000.0)
    # P(session < mean) = 1 - 1/e
    assert len(events) / len(PEERS) == pytest.approx(1 - 1 / 2.718281828, abs=0.05)


def test_poisson_arrivals_follow_the_rate() -> None:
    peers = ["p0", "p1"]
    events = schedule(horizon_s=2000.0, peers=peers, name="poisson", join_rate_per_hour=3600.0, mean_session_s=500.0)
    check_well_formed(events, peers, 2000.0)
    joins = [e for e in events if e.action == "join"]
    assert len(joins) == pytest.approx(2000, rel=0.1)  # 1 arrival/s for 2000 s
    assert all(e.peer.startswith("j") and e.gpu is None for e in joins)


def test_arrival_ids_avoid_initial_peers() -> None:
    peers = ["j0", "j2"]
    events = schedule(horizon_s=10.0, peers=peers, name="poisson", join_rate_per_hour=3600.0 * 5)
    check_well_formed(events, peers, 10.0)  # no join reuses an initial peer's id
    assert [e.peer for e in events if e.action == "join"][:2] == ["j1", "j3"]


def test_volunteer_sessions_are_heavy_tailed() -> None:
    events = schedule(name="volunteer", session_median_s=1000.0, session_sigma=1.0, rejoin_probability=0.0)
    check_well_formed(events, PEERS, FOREVER)
    sessions = [e.time for e in events]
    assert len(sessions) == len(PEERS)
    assert statistics.median(sessions) == pytest.approx(1000.0, rel=0.1)
    # lognormal: mean = median * exp(sigma^2 / 2) = 1.65 x median for sigma = 1
    assert statistics.fmean(sessions) / statistics.median(sessions) > 1.4
    assert max(sessions) > 10 * statistics.median(sessions)


def test_volunteer_rejoins_as_new_peers_after_leaving() -> None:
    events = schedule(
        name="volunteer", session_median_s=1000.0, rejoin_probability=0.5, rejoin_delay_s=300.0, crash_fraction=0.3
    )
    check_well_formed(events, PEERS, FOREVER)
    departed = {e.peer: e.time for e in events if e.action != "join"}
    joins = [e for e in events if e.action == "join"]
    assert joins and all(e.peer not in PEERS for e in joins)
    for e in joins:
        lineage, generation = e.peer.rsplit(".r", 1)
        predecessor = lineage if generation == "1" else f"{lineage}.r{int(generation) - 1}"
        assert departed[predecessor] <= e.time
    # with an unreachable horizon every session ends, and half of the departures come back
    assert len(joins) / len(departed) == pytest.approx(0.5, abs=0.05)
    assert sum(e.action == "crash" for e in events) / len(departed) == pytest.approx(0.3, abs=0.05)


def test_volunteer_with_arrivals_stays_inside_the_horizon() -> None:
    events = schedule(
        horizon_s=3600.0, peers=PEERS[:50], name="volunteer", join_rate_per_hour=200.0, session_median_s=300.0
    )
    check_well_formed(events, PEERS[:50], 3600.0)
    assert any(e.peer.startswith("j") for e in events)


@pytest.mark.parametrize("name", ["poisson", "volunteer"])
def test_same_seed_same_schedule(name: str) -> None:
    kwargs = dict(horizon_s=5000.0, peers=PEERS[:100], name=name, join_rate_per_hour=100.0, mean_session_s=1000.0)
    assert schedule(seed=1, **kwargs) == schedule(seed=1, **kwargs)
    assert schedule(seed=1, **kwargs) != schedule(seed=2, **kwargs)


def test_gpu_mix_draws_in_proportion() -> None:
    events = schedule(
        horizon_s=4000.0, peers=[], name="poisson", join_rate_per_hour=3600.0, gpu_mix={"rtx3090": 3.0, "a100": 1.0}
    )
    gpus = [e.gpu for e in events if e.action == "join"]
    assert set(gpus) == {"rtx3090", "a100"}
    assert gpus.count("rtx3090") / len(gpus) == pytest.approx(0.75, abs=0.05)
    assert all(e.gpu is None for e in events if e.action != "join")


def test_trace_is_sorted_and_cut_at_the_horizon(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path,
        "time,peer,event,gpu\n"
        "50,x,leave,\n"
        "10,x,join,a100\n"
        "20,p0,crash,\n"
        "10,a,join\n"
        "\n"
        "200,a,leave,\n",
    )
    expected = [
        ChurnEvent(10.0, "join", "a"),
        ChurnEvent(10.0, "join", "x", "a100"),
        ChurnEvent(20.0, "crash", "p0"),
        ChurnEvent(50.0, "leave", "x"),
    ]
    assert load_trace(path) == [*expected, ChurnEvent(200.0, "leave", "a")]
    cfg = ChurnConfig(name="trace", trace_file=path)
    assert churn_schedule(cfg, ["p0", "p1"], 100.0, random.Random(0)) == expected


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("10,a,join\n20,a,vanish\n", r":3: event 'vanish'"),
        ("10,a,join\nsoon,a,leave\n", r":3: time 'soon' is not a number"),
        ("-1,a,join\n", r":2: time must be"),
        ("10,a,join\n20,a,join\n", r":3: peer 'a' joins twice"),
        ("10,a,join\n20,a,leave\n30,a,join\n", r":4: peer 'a' joins after it left"),
        ("10,a,join\n10,a,leave\n", r":3: peer 'a' already has an event"),
        ("10,a,join,v100\n", r":2: unknown GPU profile 'v100'"),
        ("10,a,join,a100,y\n", r":2: expected 4 columns, got 5"),
        ("10,a,join\n20,a,leave,a100\n", r":3: a gpu is given for a leave"),
    ],
)
def test_malformed_trace_names_file_and_line(tmp_path: Path, body: str, problem: str) -> None:
    path = write_trace(tmp_path, "time,peer,event,gpu\n" + body)
    with pytest.raises(ValueError, match=r"trace\.csv" + problem):
        load_trace(path)
    with pytest.raises(ValueError, match=r"^churn\.trace_file: .*trace\.csv" + problem):
        ChurnConfig(name="trace", trace_file=path)


def test_bad_trace_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"trace\.csv:1: header"):
        load_trace(write_trace(tmp_path, "t,who,what\n1,a,join\n"))


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("10,p0,crash\n20,q,leave\n", r":3: peer 'q' leaves but is neither an initial peer"),
        ("10,p0,join\n", r":2: peer 'p0' joins but is an initial peer"),
    ],
)
def test_trace_must_agree_with_initial_peers(tmp_path: Path, body: str, problem: str) -> None:
    cfg = ChurnConfig(name="trace", trace_file=write_trace(tmp_path, "time,peer,event\n" + body))
    with pytest.raises(ValueError, match=r"^churn\.trace_file: .*trace\.csv" + problem):
        churn_schedule(cfg, ["p0"], 1000.0, random.Random(0))


def test_from_mapping() -> None:
    cfg = build_section(ChurnConfig, {"name": "volunteer", "join_rate_per_hour": 12, "gpu_mix": {"t4": 1}}, "churn")
    assert cfg == ChurnConfig(name="volunteer", join_rate_per_hour=12.0, gpu_mix={"t4": 1.0})
    allowed = r"allowed keys: name, join_rate_per_hour"
    with pytest.raises(ValueError, match=r"^churn\.rate: unknown key\(s\) rate; " + allowed):
        build_section(ChurnConfig, {"name": "poisson", "rate": 1.0}, "churn")
    with pytest.raises(ValueError, match=r"^churn\.name: missing"):
        build_section(ChurnConfig, {}, "churn")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "markov"),
        ("join_rate_per_hour", -1.0),
        ("join_rate_per_hour", "often"),
        ("join_rate_per_hour", float("inf")),
        ("mean_session_s", 0.0),
        ("session_median_s", -5.0),
        ("session_sigma", -0.1),
        ("crash_fraction", 1.5),
        ("rejoin_probability", -0.2),
        ("rejoin_delay_s", -1.0),
        ("gpu_mix", {"v100": 1.0}),
        ("gpu_mix", {"t4": 0.0}),
        ("gpu_mix", ["t4"]),
        ("trace_file", "/nonexistent/trace.csv"),
    ],
)
def test_config_rejects_bad_values(key: str, value: object) -> None:
    d = {"name": "trace" if key == "trace_file" else "poisson", key: value}
    with pytest.raises(ValueError, match=rf"^churn\.{key}"):
        build_section(ChurnConfig, d, "churn")


def test_trace_needs_a_file() -> None:
    with pytest.raises(ValueError, match=r"^churn\.trace_file: churn\.name=trace needs"):
        ChurnConfig(name="trace")


def test_schedule_rejects_bad_arguments() -> None:
    cfg = ChurnConfig(name="poisson")
    with pytest.raises(ValueError, match="initial_peers: duplicate"):
        churn_schedule(cfg, ["a", "a"], 10.0, random.Random(0))
    with pytest.raises(ValueError, match="horizon_s"):
        churn_schedule(cfg, ["a"], float("inf"), random.Random(0))
