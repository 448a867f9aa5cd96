"""The benchmark tools: tools/bench_scale.py composes the scale_bench preset; the soak's phases; the admission bench runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from node0sim.app import compose_run_config
from tests.runs import run_config
from tools.bench_scale import scale_overrides

TOOLS = Path(__file__).resolve().parent.parent / "tools"

# What tools/bench_scale.py set by hand before the preset existed (the README's scale numbers were measured with it),
# on top of the default run of then: the minimal pipeline.
EXPLICIT = [
    "model=node0_8b", "sim.numerics=false", "topology.num_stages=32", "topology.num_trainers=32", "train.schedule=async",
    "train.steps=10000000", "train.batch_size=1024", "train.micro_batch_size=1", "train.seq_len=4096", "averaging=node0",
    "churn=volunteer", "compression=subspace", "compression.rate=100", "sim.gpu=l4", "train.request_timeout_s=30",
]


@pytest.mark.parametrize("peers, virtual_s, link_sharing", [(300, None, None), (1000, 3600.0, "per_link"), (10, 300.0, "maxmin")])
def test_scale_bench_preset_is_the_hand_written_configuration(peers: int, virtual_s: float | None, link_sharing: str | None):
    explicit = [
        *EXPLICIT, f"topology.peers_per_stage={max(1, peers // 32)}", f"train.max_sim_time_s={virtual_s or 600.0}",
        f"sim.link_sharing={link_sharing or 'equal'}",
        "train.allow_partial=true",  # the preset is time-limited: stopping at max_sim_time_s is its expected outcome
    ]
    assert compose_run_config(*scale_overrides(peers, virtual_s, link_sharing)) == run_config(*explicit)


def test_the_soak_reports_steps_per_second_between_its_events():
    from tools.soak import _phases

    events = [{"event": "trainer started", "step": 0, "time_s": 0.0}, {"event": "s1p0 frozen", "step": 100, "time_s": 20.0},
              {"event": "s1p0 resumed", "step": 101, "time_s": 40.0}, {"event": "trainer ended", "step": 101, "time_s": 40.0}]
    assert [(p["from"], p["steps"], p["steps_per_s"]) for p in _phases(events)] == [
        ("trainer started", 100, 5.0), ("s1p0 frozen", 1, 0.05), ("s1p0 resumed", 0, None)]


def _live_bench(what: str, repeats: int) -> str:
    """``tools/bench_swarm.py what``'s output; its live nodes leave nothing in their runtime folder."""
    env = {**os.environ, "NODE0SIM_RUNTIME_DIR": tempfile.mkdtemp(prefix="n0-"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(TOOLS / "bench_swarm.py"), what, "--repeats", str(repeats)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not os.listdir(env["NODE0SIM_RUNTIME_DIR"])
    os.rmdir(env["NODE0SIM_RUNTIME_DIR"])
    return done.stdout


@pytest.mark.slow
def test_the_admission_benchmark_runs_and_reports_what_the_readme_quotes():
    out = _live_bench("admission", 1)
    for line in ("token: ", "check: ", "32 MB request, median of 1: "):
        assert line in out, out


@pytest.mark.slow
def test_the_dial_benchmark_runs_and_reports_what_the_readme_quotes():
    out = _live_bench("dial", 2)
    assert "routing: not found" in out and "4 live nodes on loopback, median of 2: unknown peer id " in out, out
    assert "unknown peer id / DHT get: " in out, out


def test_the_checkpoint_benchmark_runs_and_reports_what_the_readme_quotes():
    done = subprocess.run([sys.executable, str(TOOLS / "bench_swarm.py"), "checkpoint", "--repeats", "1"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MB on disk, median of 1" in done.stdout and " raw write " in done.stdout and " raw read " in done.stdout, done.stdout
