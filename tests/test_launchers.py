"""Cluster launchers (Ray on a running local cluster, submitit's local executor) give the same jobs as joblib,
resume with train.skip_if_done, and every launcher prints the sweep's progress (node0sim/sweep_progress.py)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from node0sim.sweep_progress import JOB_FILE, SWEEP_FILE, SweepProgress, planned_jobs, progress
from tests.runs import comparable

ROOT = Path(__file__).resolve().parent.parent
# two steps of the tiny model, no wandb (tested with joblib in test_sweeps.py): job start-up is most of the time
TINY = ("experiment=minimal", "train.steps=2", "train.seq_len=32", "train.batch_size=4", "train.micro_batch_size=2", "train.eval_batches=1",
        "seed=7", "wandb.enabled=false")
GRID = ("network.up_mbps=10,80",)
PLUGINS_MISSING = "the sweeps extra is not installed (pip install -e '.[sweeps]'; `make setup` does)"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(ROOT)}


def _sweep(sweep_dir: Path, *launcher: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "node0sim", "-m", *TINY, *GRID, f"hydra.sweep.dir={sweep_dir}", *launcher],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _summaries(sweep_dir: Path) -> dict[str, dict]:
    """Each job folder's name -> its summary.json."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))}


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> dict[str, dict]:
    """The reference: the grid's jobs run by the joblib launcher on local cores."""
    sweep_dir = tmp_path_factory.mktemp("joblib") / "sweep"
    result = _sweep(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert "sweep: 2/2 done, 0 failed, 0 running, 0 waiting" in result.stdout
    summaries = _summaries(sweep_dir)
    assert len(summaries) == 2
    return summaries


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[str]:
    """A Ray head node on 127.0.0.1 (``ray start --head --block``) for the duration; yields its address.

    Stopped by its own process: ``ray start --block`` stops the Ray processes it started when it gets SIGTERM
    (its process group is killed if it does not exit in time), so no other Ray on this machine is touched.
    """
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="n0ray", dir="/tmp")  # Ray's socket paths must stay short
    log = open(Path(temp_dir) / "head.log", "w+")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--ray-client-server-port={_free_port()}", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", f"--temp-dir={temp_dir}", "--object-store-memory=100000000"],
        stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in Path(log.name).read_text():
            assert head.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_cluster_sweep_gives_the_joblib_jobs_and_resumes(tmp_path, joblib_sweep):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason=PLUGINS_MISSING)
    sweep_dir = tmp_path / "ray"
    with ray_head() as address:
        launcher = ("hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={address}")
        first = _sweep(sweep_dir, *launcher)
        port = address.rsplit(":", 1)[1]
        assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{port}\.", first.stderr + first.stdout)
        assert "(_run_job pid=" in first.stdout + first.stderr  # the jobs ran as Ray tasks
        assert "sweep: 2/2 done, 0 failed, 0 running, 0 waiting" in first.stdout
        summaries = _summaries(sweep_dir)
        assert sorted(summaries) == sorted(joblib_sweep)  # same job folders
        assert {k: comparable(s) for k, s in summaries.items()} == {k: comparable(s) for k, s in joblib_sweep.items()}

        written = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.jsonl")}
        again = _sweep(sweep_dir, *launcher, "train.skip_if_done=true")
        assert "sweep: 2/2 done (2 skipped: finished before), 0 failed" in again.stdout
        assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.jsonl")} == written


@pytest.mark.slow
def test_submitit_local_sweep_gives_the_joblib_jobs(tmp_path, joblib_sweep):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=PLUGINS_MISSING)
    sweep_dir = tmp_path / "submitit"
    result = _sweep(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    assert "sweep: 2/2 done, 0 failed, 0 running, 0 waiting" in result.stdout
    assert len(list(sweep_dir.glob(".submitit/*/*_log.out"))) == 2  # one submitit job (process) per sweep job
    summaries = _summaries(sweep_dir)
    assert {k: comparable(s) for k, s in summaries.items()} == {k: comparable(s) for k, s in joblib_sweep.items()}


# ---- progress, on virtual states ----------------------------------------------------------------

def test_progress_counts_jobs_and_estimates_the_time_left():
    states = [
        {"state": "done", "start": 0.0, "end": 10.0},
        {"state": "done", "start": 0.0, "end": 20.0},
        {"state": "done", "start": 0.0, "end": 0.5, "skipped": True},  # found done: not a job's duration
        {"state": "failed", "start": 10.0, "end": 12.0},
        {"state": "running", "start": 20.0},
        {"state": "running", "start": 12.0},
    ]
    now, total, workers = 24.0, 10, 2
    got = progress(states, total, now, workers)
    mean = (10.0 + 20.0) / 2
    waiting = total - 3 - 1 - 2
    assert (got.done, got.failed, got.running, got.skipped, got.mean_job_s) == (3, 1, 2, 1, mean)
    assert got.left_s == pytest.approx((waiting * mean + (mean - 4.0) + (mean - 12.0)) / workers)
    assert got.line() == "sweep: 3/10 done (1 skipped: finished before), 1 failed, 2 running, 4 waiting | 15.0 s per job | about 37 s left"
    assert progress(states[4:], total, now, workers).left_s is None  # nothing finished yet: no estimate
    assert progress(states, None, now, workers).line().startswith("sweep: 3 done (1 skipped: finished before), 1 failed, 2 running |")


def test_planned_jobs_counts_the_grid_and_the_trials():
    def hydra_config(sweeper: dict, task: list[str]):
        return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})

    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": {"seed": "0,1,2"}}
    assert planned_jobs(hydra_config(basic, ["network.up_mbps=10,80", "train.steps=4"])) == 3 * 2
    assert planned_jobs(hydra_config(basic, ["seed=5", "compression=none,subspace"])) == 1 * 2  # the command line wins
    assert planned_jobs(hydra_config(basic, ["optim.lr=range(1,4)"])) == 3 * 3
    assert planned_jobs(hydra_config({"_target_": "x.OptunaSweeper", "n_trials": 7}, [])) == 7
    assert planned_jobs(hydra_config({"_target_": "x.OtherSweeper"}, [])) is None


def test_a_failed_job_is_counted_and_an_old_sweep_in_the_same_folder_is_not(tmp_path):
    callback = SweepProgress(poll_s=3600.0)
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": ["seed=0,1"]},
                                        "sweeper": {"_target_": "BasicSweeper", "params": None}}})
    (tmp_path / "9_old").mkdir()
    (tmp_path / "9_old" / JOB_FILE).write_text(json.dumps({"sweep_id": "earlier", "state": "done", "start": 0, "end": 1}))
    callback.on_multirun_start(sweep)
    assert json.loads((tmp_path / SWEEP_FILE).read_text())["total"] == 2
    for num, status in ((0, JobStatus.COMPLETED), (1, JobStatus.FAILED)):
        job = OmegaConf.merge(sweep, {"hydra": {"mode": RunMode.MULTIRUN, "job": {"num": num},
                                                "runtime": {"output_dir": str(tmp_path / f"{num}_seed={num}")}}})
        (tmp_path / f"{num}_seed={num}").mkdir()
        worker = pickle.loads(pickle.dumps(callback))  # a launcher ships the callback to the job's process
        worker.on_job_start(job)
        assert json.loads((tmp_path / f"{num}_seed={num}" / JOB_FILE).read_text())["state"] == "running"
        worker.on_job_end(job, JobReturn(status=status))
    lines = []
    callback._print = lines.append
    callback.on_multirun_end(sweep)
    assert lines[-1].startswith("sweep: 1/2 done, 1 failed, 0 running, 0 waiting | ")
    assert "sweep finished in" in lines[-1]


# ---- searches (the Optuna sweeper, search.objective) ---------------------------------------------

@pytest.mark.slow
def test_a_tiny_search_runs_and_returns_its_best_value(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=PLUGINS_MISSING)
    sweep_dir = tmp_path / "search"
    # the uplink search over two uplinks (its seeded TPE sampler draws both in 3 trials): 10 Mb/s cannot keep 90% of
    # the datacenter-bandwidth throughput; the datacenter bandwidth itself is the reference run again (ratio exactly 1)
    result = subprocess.run(
        [sys.executable, "-m", "node0sim", "-m", "experiment=uplink_search", "train.steps=20", "wandb.enabled=false",
         "hydra.sweeper.n_trials=3", "network.up_mbps=choice(10,100000)",
         f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/search.json"))]
    trials = {record["up_mbps"]: record for record in records}
    assert len(records) == 3 and sorted(trials) == [10, 100000]
    assert trials[10]["value"] == float("inf") and trials[10]["throughput_ratio"] < 0.9
    assert trials[100000]["value"] == 100000 and trials[100000]["throughput_ratio"] == 1.0
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == 100000 and best.best_params["network.up_mbps"] == 100000
    assert "sweep: 3/3 done, 0 failed" in result.stdout

    report = subprocess.run([sys.executable, str(ROOT / "experiments" / "report.py"), str(sweep_dir)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
    assert report.returncode == 0, report.stderr[-3000:]
    text = (sweep_dir / "report.md").read_text()
    infeasible = sum(record["value"] == float("inf") for record in records)
    assert f"Objective `min_uplink` (minimized), 3 trial(s), {infeasible} infeasible" in text
    assert "Best trial: #" in text and "network.up_mbps=100000`: value **1e+05**" in text
    assert (sweep_dir / "search_history.png").stat().st_size > 1000 and "(search_history.png)" in text


def test_time_to_loss_is_the_first_time_the_windowed_mean_reaches_the_target():
    from node0sim.search import time_to_loss

    losses = [5.0, 4.0, 3.0, 3.2, 2.6, 2.5]
    steps = [{"step": i + 1, "time_s": 10.0 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
    # windows of 2: 4.5, 3.5, 3.1, 2.9 (steps 2..5): the first mean <= 3.0 ends at step 5
    assert time_to_loss(steps, target=3.0, window=2) == 50.0
    assert time_to_loss(steps, target=5.0, window=1) == 10.0
    assert time_to_loss(steps, target=2.0, window=2) is None


@pytest.mark.parametrize("experiment,objective", [("uplink_search", "min_uplink"), ("rank_search", "time_to_loss")])
def test_search_presets_compose_with_the_optuna_sweeper(experiment, objective):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=PLUGINS_MISSING)
    from hydra import compose, initialize_config_dir

    from node0sim.app import CONF_DIR, compose_run_config

    run = compose_run_config(f"experiment={experiment}")
    assert run.search.objective == objective and run.compression.name == "subspace"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.sampler.seed == 0
    assert planned_jobs(cfg) == cfg.hydra.sweeper.n_trials


def test_search_settings_are_validated():
    from node0sim.app import compose_run_config
    from node0sim.config import ConfigError

    with pytest.raises(ConfigError, match="search.target_loss: a value is required"):
        compose_run_config("search.objective=time_to_loss")
    with pytest.raises(ConfigError, match="search.objective: 'fastest' is not one of"):
        compose_run_config("search.objective=fastest")
    with pytest.raises(ConfigError, match=r"search.throughput_fraction: must be in \(0, 1\]"):
        compose_run_config("search.objective=min_uplink", "search.throughput_fraction=1.5")
