"""Run outputs: ``metrics.jsonl`` (one JSON object per logged point), ``summary.json``, plots, progress lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TextIO

from node0sim.reporting import pyplot, readable_ylim, save_figure
from node0sim.summary import SUMMARY_KEYS, churn_events, count


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


MAX_ANNOUNCED_CHURN = 10
"""Churn events printed on lines of their own; a Node0-scale run has thousands (all are in ``metrics.jsonl``)."""


class RunRecorder:
    """Appends metric records to ``metrics.jsonl``, passes them to ``sinks`` and shows progress.

    Progress: on a terminal (``live``, default ``stream.isatty()``) one line updated in place;
    otherwise one line every ``every`` steps (default: every ~10% of ``total_steps``), at least every
    ``every_s`` seconds of wall time, and the final step. ``label`` starts every progress line. Once a swarm
    snapshot was logged, the line also shows peers per stage, averaging rounds, retried requests and state
    downloads; the first ``MAX_ANNOUNCED_CHURN`` churn records get a line of their own.
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
        self._swarm: dict[str, Any] | None = None  # the last swarm snapshot
        self._announced = 0  # churn records printed
        self._printed_step: int | None = None
        self._open_line = 0  # length of the live line on screen (0: none)

    def log(self, record: dict[str, Any]) -> None:
        """Record one point (written immediately, so a crashed run keeps its metrics)."""
        self.records.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record)
        if record.get("event") == "swarm":
            self._swarm = record
        if self.stream is None:
            return
        if "step" in record:
            self._last_step = record
            self._progress(record)
        elif record.get("event") == "churn":
            self._announce(record)

    def _line(self, record: dict[str, Any]) -> str:
        line = (
            f"{self.label}step {record['step']:>5}/{self.total_steps} | loss {_fmt(record.get('loss'), '.4f')} | "
            f"sim {record['time_s']:9.2f} s | {record['tokens_per_s']:11.1f} tok/s"
        )
        if self._swarm is None:
            return line
        per_stage = self._swarm["peers_per_stage"]
        peers = "/".join(map(str, per_stage)) if len(per_stage) <= 8 else f"{sum(per_stage)} ({min(per_stage)}-{max(per_stage)})"
        return (f"{line} | peers {peers} | averaged {self._swarm['averaging_rounds']} | "
                f"retried {record.get('retried_requests', 0)} | state loads {self._swarm.get('state_downloads', 0)}")

    def _announce(self, churn: dict[str, Any]) -> None:
        """A line of its own for a join, leave or crash (ending a live progress line first), up to MAX_ANNOUNCED_CHURN."""
        self._announced += 1
        if self._announced > MAX_ANNOUNCED_CHURN + 1:
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = 0
        if self._announced > MAX_ANNOUNCED_CHURN:
            print(f"{self.label}  (more joins, leaves and crashes: the churn records of {self.metrics_path})", file=self.stream, flush=True)
            return
        action = {"join": "joins", "leave": "leaves", "crash": "crashes", "kill": "is killed"}[churn["action"]]
        stage = "" if churn.get("stage") is None else f" (stage {churn['stage']})"
        print(f"{self.label}  at {churn['time_s']:.2f} s: peer {churn['peer']}{stage} {action}; {churn['peers']} peers now",
              file=self.stream, flush=True)

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
        """Write ``summary.json`` and the plots (``overview.png``, ``loss.png``, ``swarm.png``), close the sinks; returns the
        output paths."""
        self._end_progress()
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise KeyError(f"summary lacks {missing}")
        summary_path = write_json_atomic(self.out_dir / "summary.json", summary)  # complete or absent, never half-written
        paths = {"metrics": self.metrics_path, "summary": summary_path}
        for name, plot, file in (("overview", plot_overview, "overview.png"), ("plot", plot_loss, "loss.png"),
                                 ("swarm_plot", plot_swarm, "swarm.png")):
            written = plot(self.records, self.out_dir / file, summary)
            if written is not None:
                paths[name] = written
        self.close(summary)
        return paths

    def close(self, summary: dict[str, Any] | None) -> None:
        """Pass the end of the run to the sinks once (``summary`` None: the run failed)."""
        if summary is None:
            self._end_progress()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.finish(summary)


def run_title(summary: dict[str, Any] | None) -> str:
    """One line that says what the run was (figure titles): backend, model, swarm, schedule, codec, churn, length."""
    if not summary:
        return ""
    peers = summary.get("num_peers")
    swarm = f"{summary['num_stages']} stages" + (f" x {count(peers // summary['num_stages'], 'peer')}" if peers else "")
    codec = "dense" if summary["compression"] == "none" else f"{summary['compression']} x{summary['compression_rate']:g}"
    churn = summary["churn"] if summary.get("churn_events") is None else churn_events(summary["churn_events"])
    clock = "virtual" if summary["backend"] == "sim" else "wall-clock"
    return (f"{summary['backend']}: {summary['model']}, {swarm}, {count(summary['num_trainers'], 'trainer')}, {summary['schedule']}, "
            f"{codec}, {churn}; {summary['steps']} steps in {summary['sim_time_s']:.1f} s {clock}")


def _steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "step" in r]


def _losses(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in _steps(records) if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]


def _throughput(steps: list[dict[str, Any]]) -> tuple[list[float], list[float], int]:
    """Tokens/s over a sliding window of steps (a tenth of the run, at least 1): the virtual time of each window's
    last step, its throughput, and the window."""
    steps = [r for r in steps if "tokens" in r]
    window = max(1, len(steps) // 10)
    points = [(b["time_s"], (b["tokens"] - a["tokens"]) / (b["time_s"] - a["time_s"]))
              for a, b in zip(steps, steps[window:]) if b["time_s"] > a["time_s"]]
    return [t for t, _ in points], [v for _, v in points], window


MAX_NAMED_CHURN = 6
"""Up to this many churn events each get a legend entry naming the peer; more get one entry per kind, with its count."""


def mark_churn(ax: Any, records: list[dict[str, Any]]) -> None:
    """A dotted vertical line at every churn event (red: crash, purple: kill, grey: leave, green: join)."""
    colors = {"crash": "tab:red", "kill": "tab:purple", "leave": "tab:gray", "join": "tab:green"}
    plurals = {"crash": "crashes", "kill": "kills", "leave": "leaves", "join": "joins"}
    events = [r for r in records if r.get("event") == "churn"]
    totals = {action: sum(r["action"] == action for r in events) for action in colors}
    labelled: set[str] = set()
    for r in events:
        if len(events) <= MAX_NAMED_CHURN:
            label = f"{r['peer']} {plurals[r['action']]} at {r['time_s']:g} s"
        elif r["action"] not in labelled:
            label = count(totals[r["action"]], r["action"], plurals[r["action"]])
            labelled.add(r["action"])
        else:
            label = None
        ax.axvline(r["time_s"], color=colors[r["action"]], linestyle=":", linewidth=1.2, label=label)


def _draw_loss(ax: Any, points: list[dict[str, Any]], x_key: str, xlabel: str, summary: dict[str, Any] | None) -> None:
    ax.plot([r[x_key] for r in points], [r["loss"] for r in points], label="training loss (per step)")
    values = [r["loss"] for r in points]
    if summary and summary.get("val_loss") is not None:
        ax.plot([points[-1][x_key]], [summary["val_loss"]], "o", color="tab:orange", label=f"validation loss {summary['val_loss']:.3f}")
        values.append(summary["val_loss"])
    readable_ylim(ax, values, floor=0.0)
    ax.set(xlabel=xlabel, ylabel="loss (nats/token)")


def _draw_throughput(ax: Any, records: list[dict[str, Any]]) -> None:
    times, rates, window = _throughput(_steps(records))
    if not rates:
        return
    ax.plot(times, rates)
    readable_ylim(ax, rates, floor=0.0)
    ax.set(xlabel="virtual time (s)", ylabel=f"tokens/s (over {window} step{'s' if window > 1 else ''})", title="throughput")


def _draw_peers(ax: Any, snapshots: list[dict[str, Any]]) -> None:
    from matplotlib.ticker import MaxNLocator

    times = [r["time_s"] for r in snapshots]
    per_stage = list(zip(*[r["peers_per_stage"] for r in snapshots]))
    labelled = len(per_stage) <= 8
    for stage, counts in enumerate(per_stage):  # stacked a little apart, so equal counts stay visible
        offset = 0.04 * (stage - (len(per_stage) - 1) / 2) if labelled else 0.0
        ax.step(times, [c + offset for c in counts], where="post", label=f"stage {stage}" if labelled else None)
    ax.set_ylim(0, max(max(counts) for counts in per_stage) + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="virtual time (s)", ylabel="peers serving the stage", title="peers per stage")


def _draw_bytes(ax: Any, records: list[dict[str, Any]], summary: dict[str, Any] | None) -> None:
    steps = [r for r in _steps(records) if "bytes_sent" in r and "tokens" in r]
    if not steps:
        return
    times = [r["time_s"] for r in steps]
    ax.plot(times, [r["bytes_sent"] / 1e6 for r in steps], label="sent (all messages)")
    measured = summary.get("activation_bytes_per_token") if summary else None
    dense = summary.get("dense_activation_bytes_per_token") if summary else None
    if measured is not None and dense is not None:
        extra = dense - measured
        ax.plot(times, [(r["bytes_sent"] + extra * r["tokens"]) / 1e6 for r in steps], "--",
                label=f"with dense activations ({dense / measured:.1f}x their bytes)")
    ax.set_ylim(bottom=0)
    ax.set(xlabel="virtual time (s)", ylabel="MB sent over the network (cumulative)", title="bytes on the wire")


def plot_loss(records: list[dict[str, Any]], path: Path, summary: dict[str, Any] | None = None) -> Path | None:
    """Training loss against step and against virtual time; None when no loss was recorded."""
    points = _losses(records)
    if not points:
        return None
    plt = pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    _draw_loss(by_step, points, "step", "step (global batch)", summary)
    by_step.set(title="loss vs step")
    _draw_loss(by_time, points, "time_s", "virtual time (s)", summary)
    by_time.set(title="loss vs time")
    by_step.legend(fontsize=7)
    return _save(fig, (by_step, by_time), path, summary)


def plot_swarm(records: list[dict[str, Any]], path: Path, summary: dict[str, Any] | None = None) -> Path | None:
    """Throughput and peers per stage against virtual time; None without swarm snapshots."""
    snapshots = [r for r in records if r.get("event") == "swarm"]
    if len(snapshots) < 2:
        return None
    plt = pyplot()
    fig, (throughput, peers) = plt.subplots(1, 2, figsize=(10, 4))
    _draw_throughput(throughput, records)
    _draw_peers(peers, snapshots)
    for ax in (throughput, peers):
        mark_churn(ax, records)
    _legend(peers)
    return _save(fig, (throughput, peers), path, summary)


def plot_overview(records: list[dict[str, Any]], path: Path, summary: dict[str, Any] | None = None) -> Path | None:
    """The run on one page: loss, throughput, peers per stage and bytes sent against virtual time, churn events marked;
    None without steps."""
    if not _steps(records):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    loss, throughput, peers, sent = axes.flat
    points = _losses(records)
    if points:
        _draw_loss(loss, points, "time_s", "virtual time (s)", summary)
    loss.set(title="loss")
    _draw_throughput(throughput, records)
    snapshots = [r for r in records if r.get("event") == "swarm"]
    if snapshots:
        _draw_peers(peers, snapshots)
    _draw_bytes(sent, records, summary)
    for ax in axes.flat:
        mark_churn(ax, records)
    for ax in (loss, peers, sent):
        _legend(ax)
    return _save(fig, axes.flat, path, summary)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig: Any, axes: Sequence[Any], path: Path, summary: dict[str, Any] | None) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
    if summary:
        fig.suptitle(run_title(summary), fontsize=10)
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
