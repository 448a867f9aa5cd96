"""Sweep progress for any Hydra launcher: jobs done, failed, running and the time left, printed as jobs finish.

A Hydra callback (registered in ``conf/config.yaml``, ``hydra.callbacks.sweep_progress``). Its job half runs
wherever the launcher runs a job (a joblib worker, a Ray task, a submitit process) and records the job's state in
``<job dir>/job_state.json``; its sweep half runs in the ``node0sim -m`` process, writes the sweep's size to
``<sweep dir>/sweep_progress.json`` and, from a background thread, counts the job states and prints a line each
time a job finishes. The two halves meet in the sweep folder, so jobs on other machines are counted when the
folder is on storage they share (as their results must be).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from node0sim.metrics import write_json_atomic

SWEEP_FILE = "sweep_progress.json"
JOB_FILE = "job_state.json"


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will launch: Optuna's ``n_trials``, or the size of the basic sweeper's grid
    (``hydra.sweeper.params`` and the command line; the command line wins for a key); None when unknown."""
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return int(sweeper.n_trials)
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = sweeper.get("params") or {}
    overrides = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    sizes: dict[str, int] = {}
    try:
        for override in OverridesParser.create().parse_overrides(overrides):
            sizes[override.get_key_element()] = len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
    except Exception:  # a sweep this parser cannot expand alone (e.g. glob over a config group): size unknown
        return None
    return math.prod(sizes.values())


@dataclass(frozen=True)
class Progress:
    """Counts of one sweep's jobs at one moment, and the estimate of the time left."""

    total: int | None
    done: int
    failed: int
    running: int
    skipped: int  # of ``done``: finished earlier, found complete (train.skip_if_done=true)
    mean_job_s: float | None  # wall time of a job that ran, mean over finished ones
    left_s: float | None

    def line(self) -> str:
        """``sweep: 3/6 done, 0 failed, 2 running, 1 waiting | 12.0 s per job | about 18 s left``."""
        of = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.done}{of} done" + (f" ({self.skipped} skipped: finished before)" if self.skipped else ""),
                 f"{self.failed} failed", f"{self.running} running"]
        if self.total is not None:
            parts.append(f"{max(self.total - self.done - self.failed - self.running, 0)} waiting")
        text = "sweep: " + ", ".join(parts)
        if self.mean_job_s is not None:
            text += f" | {self.mean_job_s:.1f} s per job"
        if self.left_s is not None:
            text += f" | about {_duration(self.left_s)} left"
        return text


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def progress(states: list[dict[str, Any]], total: int | None, now: float, workers: int) -> Progress:
    """Count ``states`` (the sweep's ``job_state.json`` records) and estimate the time left.

    Time left: each waiting job takes the mean wall time of the jobs that ran, each running job the rest of that
    mean, spread over ``workers`` jobs at a time (the most seen running at once):
    ``(waiting * mean + sum(max(mean - elapsed, 0))) / workers``. None until a job has run to the end.
    """
    done = [s for s in states if s["state"] == "done"]
    failed = sum(s["state"] == "failed" for s in states)
    running = [s for s in states if s["state"] == "running"]
    ran = [s["end"] - s["start"] for s in done if not s.get("skipped")]
    mean = sum(ran) / len(ran) if ran else None
    left = None
    if mean is not None and total is not None:
        waiting = max(total - len(done) - failed - len(running), 0)
        busy = sum(max(mean - (now - s["start"]), 0.0) for s in running)
        left = (waiting * mean + busy) / max(workers, 1)
    return Progress(total, len(done), failed, len(running), sum(bool(s.get("skipped")) for s in done), mean, left)


def read_states(sweep_dir: Path, sweep_id: str) -> list[dict[str, Any]]:
    """The ``job_state.json`` records of this sweep's jobs (earlier sweeps into the same folder are ignored)."""
    states = []
    for path in Path(sweep_dir).glob(f"*/{JOB_FILE}"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("sweep_id") == sweep_id:
            states.append(state)
    return states


class SweepProgress(Callback):
    """Print the sweep's progress each time a job finishes (see the module docstring); ``poll_s``: how often the
    sweep process looks at the job states."""

    def __init__(self, poll_s: float = 1.0) -> None:
        self.poll_s = poll_s
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"poll_s": self.poll_s}  # jobs get a copy without the sweep process's thread

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # ---- the sweep process ----

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_dir = sweep_dir
        self._sweep = {"sweep_id": uuid.uuid4().hex, "total": planned_jobs(config), "start": time.time()}
        write_json_atomic(sweep_dir / SWEEP_FILE, self._sweep)
        self._workers = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sweep-progress", daemon=True)
        self._thread.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        final = dataclasses.replace(self._progress(), left_s=None)
        elapsed = time.time() - self._sweep["start"]
        self._print(f"{final.line()} | sweep finished in {_duration(elapsed)}")

    def _progress(self) -> Progress:
        states = read_states(self._sweep_dir, self._sweep["sweep_id"])
        self._workers = max(self._workers, sum(s["state"] == "running" for s in states))
        return progress(states, self._sweep["total"], time.time(), self._workers)

    def _watch(self) -> None:
        finished = 0
        while not self._stop.wait(self.poll_s):
            current = self._progress()
            if current.done + current.failed != finished:
                finished = current.done + current.failed
                self._print(current.line())

    def _print(self, line: str) -> None:
        print(line, flush=True)

    # ---- the job process (wherever the launcher runs it) ----

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep = _read_json(Path(str(config.hydra.sweep.dir)) / SWEEP_FILE)
        job_dir = Path(config.hydra.runtime.output_dir)
        self._job = {"sweep_id": sweep.get("sweep_id"), "job": int(config.hydra.job.num), "state": "running",
                     "start": time.time()}
        write_json_atomic(job_dir / JOB_FILE, self._job)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        state = {**self._job, "state": "done" if job_return.status == JobStatus.COMPLETED else "failed", "end": time.time()}
        summary = job_dir / "summary.json"
        if state["state"] == "done" and summary.is_file() and summary.stat().st_mtime < state["start"]:
            state["skipped"] = True  # train.skip_if_done found it finished: its wall time says nothing about a job's
        write_json_atomic(job_dir / JOB_FILE, state)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
