"""Hydra multirun sweeps (parallel local launcher), resume with train.skip_if_done, the sweep report,
the experiment presets and the sweep folder names."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from node0sim.app import CONF_DIR, MAX_DIRNAME, compose_run_config, safe_dirname
from node0sim.config import ConfigError, load_run_config
from tests.runs import MINIMAL
from tests.wandb_offline import offline_runs, read_run

ROOT = Path(__file__).resolve().parent.parent
TINY = (MINIMAL, "train.steps=4", "train.seq_len=32", "train.batch_size=4", "train.micro_batch_size=2", "train.eval_batches=1")
GRID = ("network.up_mbps=10,80", "compression=none,subspace")
EXPERIMENTS = ("bandwidth_sweep", "churn_sweep", "staleness_sweep", "scaling_sweep")


def _env() -> dict[str, str]:
    # one torch thread per job: two parallel jobs on two cores, whatever else the machine runs
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def _sweep(sweep_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "node0sim", "-m", *TINY, *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         f"hydra.sweep.dir={sweep_dir}", *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env(),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_parallel_sweep_report_and_resume(tmp_path):
    sweep_dir = tmp_path / "sweep"
    first = _sweep(sweep_dir)
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1", "2", "3"]
    assert jobs[0].name.startswith("0_compression=none,experiment=minimal,network.up_mbps=10,")
    assert all((p / "summary.json").is_file() and (p / "metrics.jsonl").is_file() for p in jobs)
    assert "Joblib.Parallel(n_jobs=2" in first.stdout + first.stderr
    assert "[job 3] step     4/4" in first.stdout
    assert "sweep: 4/4 done, 0 failed, 0 running, 0 waiting" in first.stdout  # progress (node0sim/sweep_progress.py)
    runs = [read_run(path) for path in offline_runs(sweep_dir)]  # wandb, offline: one run per job, grouped
    assert sorted(r["name"] for r in runs) == [p.name for p in jobs]
    assert {(r["group"], r["job_type"], r["exit_code"]) for r in runs} == {("sweep", "minimal", 0)}

    report = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "report.py"), str(sweep_dir), "--html"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env(),
    )
    assert report.returncode == 0, report.stderr[-3000:]
    text = (sweep_dir / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| #")]
    assert len(rows) == 4
    assert "network.up_mbps=10 compression=none" in rows[0] and "network.up_mbps=80 compression=subspace" in rows[3]
    assert "train.steps=4" in text and "train.steps=4" not in "".join(rows)  # common overrides are listed once
    for png in ("loss_vs_tokens", "loss_vs_time", "throughput_vs_network_up_mbps", "throughput_vs_compression"):
        assert (sweep_dir / f"{png}.png").stat().st_size > 1000, png
        assert f"({png}.png)" in text
    assert (sweep_dir / "report.html").is_file() and (sweep_dir / "results.csv").is_file()
    assert str(sweep_dir / "report.md") in report.stdout

    written = {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in jobs}
    again = _sweep(sweep_dir, "train.skip_if_done=true")
    assert again.stdout.count("already done: ") == 4
    assert "sweep: 4/4 done (4 skipped: finished before), 0 failed, 0 running, 0 waiting" in again.stdout
    assert "step " not in again.stdout
    assert sorted(p for p in sweep_dir.iterdir() if p.is_dir()) == jobs  # same job folders: resume finds them
    assert {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in jobs} == written


def test_an_interrupted_job_is_run_again(tmp_path):
    from node0sim.metrics import RunRecorder, read_complete_summary

    recorder = RunRecorder(tmp_path, 3, stream=None)
    recorder.log({"step": 1, "time_s": 1.0, "loss": 5.0, "tokens_per_s": 10.0})
    assert read_complete_summary(tmp_path) is None  # no summary yet: not done
    (tmp_path / "summary.json").write_text('{"steps": 3')  # half-written
    assert read_complete_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"steps": 3}')  # missing keys
    assert read_complete_summary(tmp_path) is None
    RunRecorder(tmp_path, 3, stream=None)  # a new attempt in the same folder drops the stale summary
    assert not (tmp_path / "summary.json").exists()


def test_sweep_folder_names_are_safe_and_stable():
    assert safe_dirname("compression=none,network.up_mbps=10") == "compression=none,network.up_mbps=10"
    weird = safe_dirname("compression.basis=/tmp/my basis.pt,data.files=['a/*.jsonl'],sim.gpu_mix={a100: 1}")
    assert "/" not in weird and " " not in weird and "*" not in weird and "'" not in weird
    long = ",".join(f"key{i}.value={i}" for i in range(100))
    assert len(safe_dirname(long)) == MAX_DIRNAME and safe_dirname(long) == safe_dirname(long)
    assert safe_dirname(long) != safe_dirname(long + "1")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {"train.skip_if_done", "wandb.enabled", "wandb.mode"} <= excluded
    assert "node0sim_safe_dirname" in OmegaConf.to_container(cfg.hydra.sweep)["subdir"]


def _sweep_points(experiment: str, *extra: str) -> tuple[list[str], list[list[str]]]:
    """The experiment's base overrides and one override list per point of its hydra.sweeper.params grid."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *extra], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params, f"{experiment} has no hydra.sweeper.params"
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return [f"experiment={experiment}", *extra], [list(point) for point in itertools.product(*axes)]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_presets_compose_and_validate(experiment):
    base, points = _sweep_points(experiment)
    assert len(points) >= 4
    run = compose_run_config(*base)
    assert run.scale.name == "small" and run.model["name"] == "tiny" and run.train.seq_len <= 64
    for point in (points[0], points[-1]):
        compose_run_config(*base, *point)
    paper_base, paper_points = _sweep_points(experiment, "scale=paper")
    paper = compose_run_config(*paper_base, *paper_points[-1])
    assert paper.scale.name == "paper" and paper.model["name"] == "node0_8b" and not paper.sim.numerics
    assert paper.train.seq_len == 4096


def test_sweep_points_take_effect():
    base, points = _sweep_points("bandwidth_sweep")
    run = compose_run_config(*base, "network.up_mbps=10", "compression=subspace")
    assert (run.network.up_mbps, run.network.down_mbps, run.compression.name) == (10, 10, "subspace")
    run = compose_run_config("experiment=scaling_sweep", "topology.peers_per_stage=4")
    assert run.topology.num_trainers == 4 and run.train.schedule == "async"
    run = compose_run_config("experiment=churn_sweep")
    assert run.churn.name == "poisson" and run.train.max_sim_time_s == 60


def test_new_sections_validate():
    with pytest.raises(ConfigError, match="scale: 'huge'"):
        compose_run_config("scale.name=huge")
    with pytest.raises(ConfigError, match=r"wandb\.mode"):
        compose_run_config("wandb.mode=sometimes")
    with pytest.raises(ConfigError, match=r"train\.skip_if_done"):
        compose_run_config("train.skip_if_done=maybe")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config"), resolve=True)
    cfg["wandb"]["colour"] = "blue"
    with pytest.raises(ConfigError, match="colour"):
        load_run_config(cfg)


def _fake_job(root: Path, name: str, overrides: list[str], tokens_per_s: float) -> None:
    from node0sim.summary import SUMMARY_KEYS

    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "summary.json").write_text(json.dumps({**{k: None for k in SUMMARY_KEYS}, "tokens_per_s": tokens_per_s}))


def test_report_heat_map_over_two_numeric_keys_averages_the_others(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    number = itertools.count()
    for up, latency, seed in itertools.product((10, 80), (5, 50), (0, 1)):
        # tokens/s = up x 100 / latency + seed: the mean over the two seeds is up x 100 / latency + 0.5
        _fake_job(tmp_path, f"{next(number)}_job", [f"network.up_mbps={up}", f"network.latency_ms={latency}", f"seed={seed}",
                                                    "compression=none"], up * 100 / latency + seed)
    jobs, _ = report.find_jobs(tmp_path)
    keys = report.varying_keys(jobs)
    assert report.heatmap_axes(jobs, keys) == ("network.up_mbps", "network.latency_ms")
    xs, ys, means = report.heatmap_grid(jobs, "network.up_mbps", "network.latency_ms", "tokens_per_s")
    assert (xs, ys) == (["10", "80"], ["5", "50"])
    assert means == [[10 * 100 / 5 + 0.5, 80 * 100 / 5 + 0.5], [10 * 100 / 50 + 0.5, 80 * 100 / 50 + 0.5]]
    written = report.build_report(tmp_path, tmp_path / "out")["written"]
    assert tmp_path / "out" / "heatmap_tokens_per_s.png" in written["plots"]
    with pytest.raises(SystemExit, match="not a varying parameter"):
        report.heatmap_axes(jobs, keys, ["network.up_mbps", "compression"])
    with pytest.raises(SystemExit, match="no job's summary has a finite number for 'val_loss'"):
        report.heatmap_grid(jobs, "network.up_mbps", "seed", "val_loss")


def test_report_without_two_numeric_varying_keys_draws_no_heat_map(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    for i, comp in enumerate(("none", "subspace")):
        _fake_job(tmp_path, f"{i}_job", ["network.up_mbps=10", f"compression={comp}"], 100.0 + i)
    jobs, _ = report.find_jobs(tmp_path)
    assert report.heatmap_axes(jobs, report.varying_keys(jobs)) is None
    report.build_report(tmp_path, tmp_path / "out")
    assert not list((tmp_path / "out").glob("heatmap_*.png"))
