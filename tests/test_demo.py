"""The default run (``experiment=demo``: the swarm a newcomer sees first), the minimal preset, and what a run reports:
the progress line, the outcome lines, the plots' axes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node0sim.app import compose_run_config
from node0sim.config import CompressionConfig, TopologyConfig, TrainConfig
from node0sim.metrics import MAX_ANNOUNCED_CHURN, RunRecorder, mark_churn, plot_overview, run_title
from node0sim.reporting import MIN_RELATIVE_SPAN, pyplot, readable_ylim
from node0sim.sim.churn import load_trace
from node0sim.sim.runner import dense_activation_bytes_per_token
from node0sim.summary import outcome_lines
from tests.runs import simulate

ROOT = Path(__file__).resolve().parent.parent
TINY = ("train.steps=2", "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=32", "train.eval_batches=0")


def test_the_default_run_is_the_demo_swarm():
    run = compose_run_config()
    assert (run.topology.num_stages, run.topology.peers_per_stage, run.topology.num_trainers) == (4, 3, 3)
    assert run.train.schedule == "async" and run.compression.name == "subspace" and run.network.name == "worldwide"
    events = [(e.time, e.action, e.peer) for e in load_trace(run.churn.trace_file)]
    assert run.churn.name == "trace" and events == [(30.0, "crash", "s0p0"), (60.0, "join", "newcomer")]


def test_the_minimal_preset_is_the_old_default_pipeline():
    run = compose_run_config("experiment=minimal")
    assert run.topology == TopologyConfig() and run.train == TrainConfig() and run.churn.name == "none"
    assert run.compression == CompressionConfig(seed=run.seed) and run.network.name == "internet"


def test_a_later_experiment_replaces_the_default_one():
    assert compose_run_config("experiment=minimal", "experiment=headline").topology.num_stages == 32


def test_the_dense_twin_measures_what_the_dense_run_sends(tmp_path):
    dense = simulate(tmp_path / "dense", *TINY)
    compressed = simulate(tmp_path / "subspace", *TINY, "compression=subspace", "compression.rate=8")
    assert dense["dense_activation_bytes_per_token"] is None  # nothing to compare with
    assert compressed["dense_activation_bytes_per_token"] == dense["activation_bytes_per_token"]
    assert compressed["activation_bytes_per_token"] < dense["activation_bytes_per_token"] / 4
    # the same on a swarm with churn: bytes per token depend on the shapes, not on who serves them
    swarm = compose_run_config(*TINY, "compression=subspace", "compression.rate=8")
    assert dense_activation_bytes_per_token(swarm) == dense["activation_bytes_per_token"]


def _summary(**changes) -> dict:
    summary = {
        "backend": "sim", "model": "tiny", "num_stages": 4, "num_peers": 12, "num_trainers": 3, "schedule": "async",
        "compression": "subspace", "compression_rate": 8.0, "churn": "trace", "steps": 200, "sim_time_s": 80.0,
        "tokens": 1_000_000, "final_peers_per_stage": [3, 3, 3, 3], "churn_events": {"join": 1, "leave": 0, "crash": 1},
        "averaging_rounds": 400, "solo_steps": 1, "averaging_timeouts": 2, "state_averaging_rounds": 80,
        "state_downloads": 1, "state_download_bytes": 2_500_000, "failed_state_downloads": 0, "declined_state_downloads": 0,
        "failed_requests": 4, "retried_requests": 4, "dropped_micro_batches": 0, "activation_bytes_per_token": 1000.0,
        "dense_activation_bytes_per_token": 8000.0, "val_loss": None,
    }
    return {**summary, **changes}


def test_the_outcome_lines_name_what_happened():
    assert outcome_lines(_summary()) == [
        "swarm: 4 stages, 12 peers at the start, 3 trainers; 1 crash, 1 join; peers per stage at the end 3/3/3/3",
        "averaging: 400 gradient rounds with the stage's peers, 1 solo step, 2 timeouts; 80 parameter rounds (SPARTA); "
        "1 state download (2.5 MB)",
        "requests: 4 failed, 4 retried on another peer, 0 micro-batches dropped",
        "compression: subspace (rate 8): 1,000 activation bytes per token instead of 8,000 dense (8.0x fewer), "
        "7,000.0 MB saved",  # (8000 - 1000) B/token x 1e6 tokens
    ]
    live = outcome_lines(_summary(num_peers=None, averaging_rounds=None, dense_activation_bytes_per_token=None))
    assert live == ["requests: 4 failed, 4 retried on another peer, 0 micro-batches dropped",
                    "compression: subspace: 1,000 activation bytes per token"]
    assert "no churn" in outcome_lines(_summary(churn_events={"join": 0, "leave": 0, "crash": 0}))[0]


def test_the_title_says_what_the_run_was():
    assert run_title(_summary()) == ("sim: tiny, 4 stages x 3 peers, 3 trainers, async, subspace x8, 1 crash, 1 join; "
                                     "200 steps in 80.0 s virtual")
    assert "4 stages x 1 peer, 1 trainer, sync, dense, no churn" in run_title(_summary(
        num_peers=4, num_trainers=1, schedule="sync", compression="none", churn_events={"join": 0, "leave": 0, "crash": 0}))


def test_the_progress_line_shows_the_swarm_and_churn_gets_its_own_line(tmp_path):
    out = io.StringIO()
    recorder = RunRecorder(tmp_path, 10, stream=out, every=1)
    recorder.log({"event": "swarm", "time_s": 2.0, "peers_per_stage": [3, 2], "peers": 5, "averaging_rounds": 7,
                  "state_downloads": 1, "max_epoch_per_stage": [2, 2]})
    recorder.log({"event": "churn", "time_s": 2.5, "action": "crash", "peer": "s0p0", "stage": 0, "peers": 4})
    recorder.log({"step": 1, "time_s": 3.0, "loss": 2.0, "tokens_per_s": 10.0, "retried_requests": 2})
    assert out.getvalue().splitlines() == [
        "  at 2.50 s: peer s0p0 (stage 0) crashes; 4 peers now",
        "step     1/10 | loss 2.0000 | sim      3.00 s |        10.0 tok/s | peers 3/2 | averaged 7 | retried 2 | state loads 1",
    ]


@pytest.mark.parametrize("values", [[1547.0] * 5, [1547.0, 1547.0 + 1e-8, 1547.0 - 1e-8], [0.0, 0.0]])
def test_a_constant_series_gets_an_axis_a_few_percent_wide(values):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot(range(len(values)), values)
    readable_ylim(ax, values)
    low, high = ax.get_ylim()
    # the values' range is far below 5% of their size: the axis is exactly 5% wide (1 when they are 0), centred on them
    assert high - low == pytest.approx(MIN_RELATIVE_SPAN * max(abs(v) for v in values) or 1.0)
    assert (low + high) / 2 == pytest.approx((min(values) + max(values)) / 2)
    assert not ax.yaxis.get_major_formatter().get_offset()  # no "+1.547e3" offset label
    plt.close(fig)


def test_a_varying_series_keeps_its_range_and_the_floor_holds():
    plt = pyplot()
    fig, ax = plt.subplots()
    readable_ylim(ax, [2.0, 4.0], floor=0.0)
    assert ax.get_ylim() == pytest.approx((3.0 - 1.1, 3.0 + 1.1))  # the range (2) plus 10%, centred
    readable_ylim(ax, [0.0, 10.0], floor=0.0)
    assert ax.get_ylim() == pytest.approx((0.0, 11.0))  # the floor moves the window up, keeping its span
    plt.close(fig)


def test_the_overview_figure_is_written_for_a_run_without_swarm_records(tmp_path):
    records = [{"step": s, "time_s": float(s), "loss": 3.0, "tokens": 100 * s, "tokens_per_s": 100.0, "bytes_sent": 10 * s}
               for s in range(1, 11)]
    assert plot_overview(records, tmp_path / "overview.png", _summary()).stat().st_size > 1000
    assert plot_overview([], tmp_path / "none.png", None) is None


@pytest.mark.slow
def test_the_default_run_shows_averaging_a_crash_and_a_state_download(tmp_path):
    """``make run`` as a newcomer runs it (the whole default run: its crash and join are at 30 s and 60 s of virtual
    time, about 80 s in)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "node0sim", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                            timeout=1800, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 200 and summary["averaging_rounds"] > 0
    assert summary["churn_events"] == {"join": 1, "leave": 0, "crash": 1, "kill": 0, "watchdog_exit": 0} and summary["state_downloads"] >= 1
    assert summary["retried_requests"] > 0 and summary["dropped_micro_batches"] == 0
    assert summary["final_peers_per_stage"] == [3, 3, 3, 3]
    assert summary["dense_activation_bytes_per_token"] > 4 * summary["activation_bytes_per_token"]
    assert "peer s0p0 (stage 0) crashes" in result.stdout and "peer newcomer joins" in result.stdout
    assert "1 crash, 1 join" in result.stdout and "state download" in result.stdout and "MB saved" in result.stdout
    for png in ("overview.png", "loss.png", "swarm.png"):
        assert (tmp_path / png).stat().st_size > 1000, png


def test_many_churn_events_get_one_legend_entry_per_kind(tmp_path):
    records = [{"step": s, "time_s": float(s), "loss": 3.0, "tokens": 100 * s, "tokens_per_s": 100.0, "bytes_sent": 10 * s}
               for s in range(1, 11)]
    records += [{"event": "churn", "time_s": t / 10, "action": "crash" if t % 2 else "join", "peer": f"p{t}", "stage": None,
                 "peers": 3} for t in range(40)]
    plt = pyplot()
    fig, ax = plt.subplots()
    mark_churn(ax, records)
    assert len(ax.get_lines()) == 40 and sorted(ax.get_legend_handles_labels()[1]) == ["20 crashes", "20 joins"]
    plt.close(fig)


def test_only_the_first_churn_events_get_lines_of_their_own(tmp_path):
    out = io.StringIO()
    recorder = RunRecorder(tmp_path, 10, stream=out)
    for k in range(MAX_ANNOUNCED_CHURN + 5):
        recorder.log({"event": "churn", "time_s": float(k), "action": "join", "peer": f"j{k}", "stage": None, "peers": k})
    lines = out.getvalue().splitlines()
    assert len(lines) == MAX_ANNOUNCED_CHURN + 1 and "metrics.jsonl" in lines[-1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == MAX_ANNOUNCED_CHURN + 5
