"""Run outputs: ``metrics.jsonl`` (one JSON object per logged point), ``summary.json`` and a loss plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

SUMMARY_KEYS = (
    "backend", "num_stages", "num_peers", "steps", "samples", "tokens", "sim_time_s", "wall_time_s",
    "tokens_per_s", "loss_first", "loss_last", "bytes_sent", "activation_bytes_per_token",
    "failed_requests", "retried_requests",
)
"""Keys every ``summary.json`` has (MISSION.md); runs add more."""


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class RunRecorder:
    """Appends metric records to ``metrics.jsonl`` and prints one progress line per step."""

    def __init__(self, out_dir: Path, total_steps: int, stream: TextIO | None = sys.stdout):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.total_steps = total_steps
        self.stream = stream
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        """Record one point (written immediately, so a crashed run keeps its metrics)."""
        self.records.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.stream is not None and "step" in record:
            print(
                f"step {record['step']:>5}/{self.total_steps} | loss {_fmt(record.get('loss'), '.4f')} | "
                f"sim {record['time_s']:9.2f} s | {record['tokens_per_s']:11.1f} tok/s",
                file=self.stream,
                flush=True,
            )

    def finish(self, summary: dict[str, Any]) -> dict[str, Path]:
        """Write ``summary.json`` and ``loss.png``; returns the output paths."""
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise KeyError(f"summary lacks {missing}")
        summary_path = self.out_dir / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        paths = {"metrics": self.metrics_path, "summary": summary_path}
        for name, plot in (("plot", plot_loss(self.records, self.out_dir / "loss.png")),
                           ("swarm_plot", plot_swarm(self.records, self.out_dir / "swarm.png"))):
            if plot is not None:
                paths[name] = plot
        return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss against step and against virtual time; None when no loss was recorded."""
    points = [r for r in records if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    if not points:
        return None
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    by_step.plot([r["step"] for r in points], [r["loss"] for r in points])
    by_step.set(xlabel="step (global batch)", ylabel="training loss", title="loss vs step")
    by_time.plot([r["time_s"] for r in points], [r["loss"] for r in points])
    by_time.set(xlabel="virtual time (s)", ylabel="training loss", title="loss vs time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_swarm(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Throughput and peers per stage against virtual time; None without swarm snapshots."""
    snapshots = [r for r in records if r.get("event") == "swarm"]
    steps = [r for r in records if "step" in r]
    if len(snapshots) < 2:
        return None
    plt = _pyplot()
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
    for ax in (throughput, peers):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
