"""The ``node0sim`` command as a user runs it, and the run outputs."""

import json
import subprocess
import sys

import pytest

from node0sim.config import ConfigError
from node0sim.metrics import SUMMARY_KEYS
from tests.runs import MINIMAL, comparable, run_config, simulate

SMALL = (MINIMAL, "train.steps=12", "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=64", "train.eval_batches=1")


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "node0sim", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_cli_run_writes_summary_metrics_and_plot_and_loss_goes_down(tmp_path):
    result = _cli(*SMALL, f"hydra.run.dir={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["backend"] == "sim" and summary["num_stages"] == 4 and summary["steps"] == 12
    assert summary["tokens"] == 12 * 8 * 64 and summary["samples"] == 12 * 8
    assert summary["loss_last"] < summary["loss_first"] - 0.5
    assert summary["bytes_sent"] > 0 and summary["activation_bytes_per_token"] > 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "step" in r] == list(range(1, 13))
    assert any(r.get("event") == "swarm" and r["peers_per_stage"] == [1, 1, 1, 1] for r in lines)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert "step    12/12" in result.stdout and str(tmp_path) in result.stdout


@pytest.mark.slow
def test_cli_wrong_values_fail_fast_naming_the_key(tmp_path):
    bad_value = _cli("train.schedule=sometimes", f"hydra.run.dir={tmp_path}", check=False)
    assert bad_value.returncode != 0
    assert "train.schedule" in bad_value.stderr and "'sync', 'async'" in bad_value.stderr
    bad_key = _cli("train.stepz=3", f"hydra.run.dir={tmp_path}", check=False)
    assert bad_key.returncode != 0 and "stepz" in bad_key.stderr
    bad_group = _cli("model=huge", f"hydra.run.dir={tmp_path}", check=False)
    assert bad_group.returncode != 0 and "tiny" in bad_group.stderr and "node0_8b" in bad_group.stderr


@pytest.mark.slow
def test_cli_help_and_cfg_job_work_as_in_any_hydra_app():
    assert "Configuration groups" in _cli("--help").stdout
    job = _cli("--cfg", "job", "topology.num_stages=2").stdout
    assert "num_stages: 2" in job and "numerics: true" in job


@pytest.mark.parametrize(
    "override,key",
    [
        ("network.up_mbps=0", "network.up_mbps"),
        ("network.regions=mars", "network.regions"),
        ("topology.num_stages=9", "topology.num_stages"),
        ("train.batch_size=6", "train.batch_size"),
        ("train.seq_len=4096", "train.seq_len"),
        ("sim.gpu=abacus", "sim.gpu"),
        ("sim.utilization=2", "sim.utilization"),
        ("train.steps=many", "train.steps"),
        ("data.source=web", "data.source"),
        ("model.n_kv_heads=3", "n_kv_heads"),
    ],
)
def test_bad_values_name_their_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        simulate(tmp_path, *SMALL, override)


def test_mission_overrides_take_effect():
    run = run_config(
        "network.up_mbps=10", "network.down_mbps=20", "network.latency_ms=30", "topology.num_stages=2",
        "train.steps=7", "train.max_sim_time_s=100", "train.schedule=async", "seed=5", "sim.numerics=false",
        "model=node0_8b",
    )
    assert (run.network.up_mbps, run.network.down_mbps, run.network.latency_ms) == (10, 20, 30)
    assert (run.topology.num_stages, run.train.steps, run.train.max_sim_time_s) == (2, 7, 100)
    assert (run.train.schedule, run.seed, run.sim.numerics, run.model["name"]) == ("async", 5, False, "node0_8b")


def test_same_seed_gives_the_same_summary(tmp_path):
    first = simulate(tmp_path / "a", *SMALL, "seed=3", "network.jitter_ms=5")
    second = simulate(tmp_path / "b", *SMALL, "seed=3", "network.jitter_ms=5")
    other = simulate(tmp_path / "c", *SMALL, "seed=4", "network.jitter_ms=5")
    same = comparable(first)
    assert same == comparable(second)
    assert same["loss_last"] != other["loss_last"] and same["sim_time_s"] != other["sim_time_s"]


def test_bandwidth_and_latency_change_throughput(tmp_path):
    fast = simulate(tmp_path / "fast", *SMALL, "network=datacenter", "train.eval_batches=0")
    slow = simulate(tmp_path / "slow", *SMALL, "network.up_mbps=10", "network.down_mbps=10", "train.eval_batches=0")
    assert slow["sim_time_s"] > 5 * fast["sim_time_s"]
    assert slow["bytes_sent"] == fast["bytes_sent"]


def test_timing_mode_runs_node0_8b_without_tensors(tmp_path):
    summary = simulate(
        tmp_path, "model=node0_8b", "sim.numerics=false", "topology.num_stages=32", "train.steps=2",
        "train.batch_size=2", "train.micro_batch_size=1", "train.seq_len=4096", "network=datacenter", "sim.gpu=h100",
    )
    assert summary["steps"] == 2 and summary["loss_first"] is None and summary["tokens"] == 2 * 2 * 4096
    # bf16 hidden states: 2 bytes x 4096 dims per token per hop, 2 hops (via the trainer) per boundary and direction
    assert summary["activation_bytes_per_token"] > 31 * 2 * 2 * 2 * 4096


def test_numerics_mode_refuses_a_model_too_big_for_this_machine(tmp_path):
    with pytest.raises(ConfigError, match="sim.numerics=false"):
        simulate(tmp_path, "model=node0_8b", "topology.num_stages=32", "train.seq_len=64")


def test_max_sim_time_stops_the_run(tmp_path):
    summary = simulate(tmp_path, *SMALL, "train.max_sim_time_s=3", "train.eval_batches=0")
    assert summary["sim_time_s"] == pytest.approx(3.0) and summary["steps"] < 12


def test_experiment_presets_override_the_primary_config():
    # regression: with _self_ after the experiment, config.yaml's sim block silently won over the preset
    run = run_config("experiment=headline", "network=datacenter")
    assert run.model["name"] == "node0_8b" and run.sim.numerics is False and run.topology.num_stages == 32
    assert run.compression.name == "subspace" and run.compression.rate == 100 and run.network.name == "datacenter"


def test_a_gpu_mix_can_be_given_on_the_command_line(tmp_path):
    # regression: an empty mapping in the YAML refused new keys (Hydra struct mode)
    run = run_config("sim.gpu_mix={rtx3090: 1, a100: 3}", "churn=volunteer")
    assert run.sim.gpu_mix == {"rtx3090": 1, "a100": 3} and run.churn.gpu_mix == {"rtx3090": 1, "a100": 3}
    with pytest.raises(ConfigError, match="sim.gpu_mix"):
        run_config("sim.gpu_mix={abacus: 1}")
