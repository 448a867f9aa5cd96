"""Run outputs: ``metrics.jsonl`` (one JSON object per logged point), ``summary.json``, plots, progress lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TextIO

from node0sim.reporting import pyplot, save_figure
from node0sim.summary import SUMMARY_KEYS


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class Sink(Protocol):
    """Somewhere else a run's records go (e.g. :class:`node0sim.tracking.WandbSink`); must not raise."""

    def log(self, record: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any] | None) -> None:
        """The run ended: ``summary`` as written to ``summary.json``, or None when the run failed."""


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def write_json_atomic(path: Path, value: Any) -> Path:
    """Write ``value`` as JSON to ``path`` through a temporary file: readers see it complete or not at all."""
    path = Path(path)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
    return path


def read_complete_summary(out_dir: Path) -> dict[str, Any] | None:
    """``out_dir/summary.json`` if it is a finished run's summary (valid JSON with every SUMMARY_KEY), else None."""
    try:
        summary = json.loads((Path(out_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or any(k not in summary for k in SUMMARY_KEYS):
        return None
    return summary


class RunRecorder:
    """Appends metric records to ``metrics.jsonl``, passes them to ``sinks`` and shows progress.

    Progress: on a terminal (``live``, default ``stream.isatty()``) one line updated in place;
    otherwise one line every ``every`` steps (default: every ~10% of ``total_steps``), at least every
    ``every_s`` seconds of wall time, and the final step. ``label`` starts every progress line.
    """

    def __init__(
        self,
        out_dir: Path,
        total_steps: int,
        stream: TextIO | None = sys.stdout,
        sinks: Sequence[Sink] = (),
        live: bool | None = None,
        every: int | None = None,
        every_s: float = 30.0,
        label: str = "",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        (self.out_dir / "summary.json").unlink(missing_ok=True)  # a stale summary would mark this run done
        self.total_steps = total_steps
        self.stream = stream
        self.sinks = list(sinks)
        self.records: list[dict[str, Any]] = []
        self.live = stream is not None and (_isatty(stream) if live is None else live)
        self.every = every or max(1, math.ceil(total_steps / 10))
        self.every_s = every_s
        self.label = label
        self._last_print = time.monotonic()
        self._last_step: dict[str, Any] | None = None
        self._printed_step: int | None = None
        self._open_line = 0  # length of the live line on screen (0: none)

    def log(self, record: dict[str, Any]) -> None:
        """Record one point (written immediately, so a crashed run keeps its metrics)."""
        self.records.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record)
        if self.stream is not None and "step" in record:
            self._last_step = record
            self._progress(record)

    def _line(self, record: dict[str, Any]) -> str:
        return (
            f"{self.label}step {record['step']:>5}/{self.total_steps} | loss {_fmt(record.get('loss'), '.4f')} | "
            f"sim {record['time_s']:9.2f} s | {record['tokens_per_s']:11.1f} tok/s"
        )

    def _progress(self, record: dict[str, Any]) -> None:
        line = self._line(record)
        if self.live:
            self.stream.write("\r" + line.ljust(self._open_line))
            self._open_line = len(line)
            self._printed_step = record["step"]
            if record["step"] >= self.total_steps:
                self.stream.write("\n")
                self._open_line = 0
            self.stream.flush()
            return
        now = time.monotonic()
        step = record["step"]
        if step == 1 or step % self.every == 0 or step >= self.total_steps or now - self._last_print >= self.every_s:
            print(line, file=self.stream, flush=True)
            self._last_print = now
            self._printed_step = step

    def _end_progress(self) -> None:
        if self.stream is None:
            return
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = 0
        elif self._last_step is not None and self._printed_step != self._last_step["step"]:
            print(self._line(self._last_step), file=self.stream, flush=True)
            self._printed_step = self._last_step["step"]

    def finish(self, summary: dict[str, Any]) -> dict[str, Path]:
        """Write ``summary.json`` and ``loss.png``, close the sinks; returns the output paths."""
        self._end_progress()
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise KeyError(f"summary lacks {missing}")
        summary_path = write_json_atomic(self.out_dir / "summary.json", summary)  # complete or absent, never half-written
        paths = {"metrics": self.metrics_path, "summary": summary_path}
        for name, plot in (("plot", plot_loss(self.records, self.out_dir / "loss.png")),
                           ("swarm_plot", plot_swarm(self.records, self.out_dir / "swarm.png"))):
            if plot is not None:
                paths[name] = plot
        self.close(summary)
        return paths

    def close(self, summary: dict[str, Any] | None) -> None:
        """Pass the end of the run to the sinks once (``summary`` None: the run failed)."""
        if summary is None:
            self._end_progress()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.finish(summary)


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss against step and against virtual time; None when no loss was recorded."""
    points = [r for r in records if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    if not points:
        return None
    plt = pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    by_step.plot([r["step"] for r in points], [r["loss"] for r in points])
    by_step.set(xlabel="step (global batch)", ylabel="training loss", title="loss vs step")
    by_time.plot([r["time_s"] for r in points], [r["loss"] for r in points])
    by_time.set(xlabel="virtual time (s)", ylabel="training loss", title="loss vs time")
    return _save(fig, (by_step, by_time), path)


def plot_swarm(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Throughput and peers per stage against virtual time; None without swarm snapshots."""
    snapshots = [r for r in records if r.get("event") == "swarm"]
    steps = [r for r in records if "step" in r]
    if len(snapshots) < 2:
        return None
    plt = pyplot()
    fig, (throughput, peers) = plt.subplots(1, 2, figsize=(10, 4))
    window = [(b["time_s"], (b["tokens"] - a["tokens"]) / (b["time_s"] - a["time_s"]))
              for a, b in zip(steps, steps[1:]) if b["time_s"] > a["time_s"]]
    if window:
        throughput.plot(*zip(*window))
    throughput.set(xlabel="virtual time (s)", ylabel="tokens/s (between steps)", title="throughput")
    times = [r["time_s"] for r in snapshots]
    per_stage = list(zip(*[r["peers_per_stage"] for r in snapshots]))
    for stage, counts in enumerate(per_stage):
        peers.step(times, counts, where="post", label=f"stage {stage}" if len(per_stage) <= 8 else None)
    peers.set(xlabel="virtual time (s)", ylabel="peers", title="peers per stage")
    if len(per_stage) <= 8:
        peers.legend(fontsize=7)
    return _save(fig, (throughput, peers), path)


def _save(fig: Any, axes: Sequence[Any], path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


class StepTracker:
    """Turns finished micro-batches (from any number of trainers) into one record per global batch.

    ``counters()`` supplies run-wide totals (failed and retried requests, ...) added to each record.
    """

    def __init__(self, micro_batches_per_step: int, emit: Callable[[dict[str, Any]], None], counters: Callable[[], dict[str, Any]]):
        self.micro_batches_per_step = micro_batches_per_step
        self.emit = emit
        self.counters = counters
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self._losses: list[float] = []
        self._pending = 0

    def __call__(self, micro_batch: dict[str, Any]) -> None:
        self.samples += micro_batch["samples"]
        self.tokens += micro_batch["tokens"]
        if micro_batch["loss"] is not None:
            self._losses.append(micro_batch["loss"])
        self._pending += 1
        if self._pending < self.micro_batches_per_step:
            return
        self.steps += 1
        losses, self._losses, self._pending = self._losses, [], 0
        now = micro_batch["time_s"]
        self.emit(
            {
                "step": self.steps,
                "time_s": now,
                "loss": sum(losses) / len(losses) if losses else None,
                "samples": self.samples,
                "tokens": self.tokens,
                "tokens_per_s": self.tokens / now if now > 0 else 0.0,
                **self.counters(),
            }
        )
