"""wandb tracking (offline: nothing leaves the machine), never fatal; progress output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from node0sim.metrics import RunRecorder
from node0sim.tracking import WandbSink, flatten_record, sweep_group
from tests.runs import MINIMAL, run_config
from tests.wandb_offline import offline_runs, read_run

ROOT = Path(__file__).resolve().parent.parent
TINY = (MINIMAL, "train.steps=3", "train.seq_len=32", "train.batch_size=4", "train.micro_batch_size=2", "train.eval_batches=1")


def _cli(run_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "node0sim", *TINY, f"hydra.run.dir={run_dir}", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_offline_run_logs_config_metrics_and_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # unset: offline by default
    result = subprocess.run(
        [sys.executable, "-m", "node0sim", *TINY, f"hydra.run.dir={tmp_path}", "sim.snapshot_period_s=0.5"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = offline_runs(tmp_path)
    assert path.is_relative_to(tmp_path / "wandb")
    assert f"wandb (offline): {path.parent}" in result.stdout
    run = read_run(path)
    assert run["project"] == "node0sim" and run["job_type"] == "minimal" and run["exit_code"] == 0  # the experiment
    assert run["config"]["train"]["steps"] == 3 and run["config"]["model"]["name"] == "tiny"
    assert "train.steps=3" in run["config"]["overrides"]

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in run["history"] if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in records if "step" in r])
    assert all("time_s" in r and "tokens_per_s" in r for r in steps)
    swarm = [r for r in run["history"] if "swarm/peers" in r]
    assert len(swarm) == sum(r.get("event") == "swarm" for r in records) >= 2
    assert swarm[0]["swarm/peers_per_stage/3"] == 1 and "time_s" in swarm[0]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert run["summary"]["tokens_per_s"] == pytest.approx(summary["tokens_per_s"])
    assert run["summary"]["val_loss"] == pytest.approx(summary["val_loss"])


@pytest.mark.slow
def test_a_run_completes_when_wandb_cannot_start(tmp_path):
    result = _cli(tmp_path, WANDB_MODE="invalid")
    output = result.stdout + result.stderr
    assert output.count("wandb unavailable") == 1
    assert "metrics are still in metrics.jsonl" in output
    assert "step     3/3" in result.stdout and (tmp_path / "summary.json").is_file()
    assert not offline_runs(tmp_path)


class _Broken:
    """A wandb run that fails when logging or when finishing."""

    url = None
    settings = SimpleNamespace(sync_dir="offline-run-x")

    def __init__(self, fail_on: str):
        self.fail_on = fail_on
        self.finished: list[int] = []

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, payload):
        if self.fail_on == "log":
            raise ConnectionError("the network went away\nsecond line")

    @property
    def summary(self):
        raise RuntimeError("no summary") if self.fail_on == "finish" else None

    def finish(self, exit_code=0, quiet=None):
        self.finished.append(exit_code)


def _recorder_with(tmp_path, sink, stream=None) -> RunRecorder:
    recorder = RunRecorder(tmp_path, 2, stream=stream, sinks=[sink])
    for step in (1, 2):
        recorder.log({"step": step, "time_s": float(step), "loss": 1.0, "tokens_per_s": 5.0, "tokens": 10 * step})
    return recorder


def _summary() -> dict:
    from node0sim.metrics import SUMMARY_KEYS

    return {key: 0 for key in SUMMARY_KEYS} | {"loss_first": None, "loss_last": None}


def test_wandb_init_failure_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    sink = WandbSink(tmp_path, {"seed": 0})
    recorder = _recorder_with(tmp_path, sink)
    recorder.finish(_summary())
    err = capsys.readouterr().err
    assert err.count("wandb unavailable") == 1 and "api_key not configured" in err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("fail_on", ["log", "finish"])
def test_wandb_failure_mid_run_warns_once(tmp_path, monkeypatch, capsys, fail_on):
    import wandb

    broken = _Broken(fail_on)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: broken)
    sink = WandbSink(tmp_path, {"seed": 0})
    assert sink.active and sink.location == "offline-run-x"
    recorder = _recorder_with(tmp_path, sink)
    recorder.finish(_summary())
    err = capsys.readouterr().err
    assert err.count("wandb unavailable") == 1 and err.strip().count("\n") == 0
    assert broken.finished == [1] and sink.location is None
    assert (tmp_path / "summary.json").is_file()


def test_wandb_can_be_switched_off(tmp_path):
    from node0sim.tracking import make_sinks

    assert make_sinks(run_config("wandb.enabled=false"), {}, tmp_path) == []
    assert run_config().wandb.project == "node0sim" and run_config().wandb.enabled


def test_records_flatten_for_wandb():
    swarm = {"event": "swarm", "time_s": 60.0, "peers_per_stage": [2, 1], "peers": 3, "name": "x"}
    assert flatten_record(swarm) == {"time_s": 60.0, "swarm/peers_per_stage/0": 2, "swarm/peers_per_stage/1": 1,
                                     "swarm/peers": 3}
    step = {"step": 3, "time_s": 1.5, "loss": None, "tokens_per_s": 9.0, "ok": True}
    assert flatten_record(step) == {"step": 3, "time_s": 1.5, "tokens_per_s": 9.0, "ok": 1}
    assert sweep_group(Path("multirun/2026-11-25/08-40-12")) == "2026-11-25_08-40-12"
    assert sweep_group(Path("/x/multirun/my_sweep")) == "my_sweep"
    assert sweep_group(Path("multirun/churn_sweep/2026-11-25_08-40-12")) == "churn_sweep_2026-11-25_08-40-12"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_sparse_and_ends_with_the_last_step(tmp_path):
    out = io.StringIO()
    recorder = RunRecorder(tmp_path, 100, stream=out)
    for step in range(1, 101):
        recorder.log({"step": step, "time_s": step * 0.5, "loss": 2.0, "tokens_per_s": 10.0})
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].startswith("step     1/100") and lines[-1].startswith("step   100/100")
    assert "\r" not in out.getvalue()


def test_progress_of_a_run_stopped_early_still_shows_its_last_step(tmp_path):
    out = io.StringIO()
    recorder = RunRecorder(tmp_path, 100, stream=out)
    for step in range(1, 38):
        recorder.log({"step": step, "time_s": step * 0.5, "loss": 2.0, "tokens_per_s": 10.0})
    recorder.finish(_summary())
    assert out.getvalue().splitlines()[-1].startswith("step    37/100")


def test_progress_on_a_terminal_is_one_updating_line(tmp_path):
    out = _Terminal()
    recorder = RunRecorder(tmp_path, 12, stream=out)
    for step in range(1, 13):
        recorder.log({"step": step, "time_s": step * 0.5, "loss": 2.0, "tokens_per_s": 10.0})
    recorder.finish(_summary())
    text = out.getvalue()
    assert text.count("\r") == 12 and text.count("\n") == 1 and text.endswith("\n")
    assert "step    12/12 | loss 2.0000 | sim      6.00 s |        10.0 tok/s" in text
