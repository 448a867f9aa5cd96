"""The simulator held against a live swarm on kernel-shaped links (needs root: swarm/netlab.py).

    python experiments/fidelity.py [--quick] [--out DIR] [--steps N] [--only 4,5]
    python experiments/fidelity.py --resim FIDELITY_JSON [...] [--out DIR]   # the simulator again, stored live runs

Every scenario runs twice: live (bootstrap, stage servers and trainers as real ``node0sim backend=swarm``
processes, each in its own network namespace with tbf-shaped uplink and downlink, pinned round-robin to the
machine's cores, one torch thread each) and on the simulator with the same settings, once with
``sim.transport=fluid`` and once with ``sim.transport=tcp``. The simulator's "GPU" runs at the FLOP/s this
CPU achieves on the stages' own calls (:func:`stage_call_rate`: one micro-batch's forward, tail and backward
calls through every stage of the scenario's model, one thread, pinned to one core, the FLOPs the simulator
charges for them over their median time), measured right before each scenario's live run; the matmul rate a
live peer announces (``swarm.roles.measured_flops``) is reported beside it. The lab's DHT operation time and TCP
round trip (:func:`tools.bench_wire.lab_timings`) are measured then too and given to the simulator
(``sim.dht_latency_ms``, ``sim.tcp_rtt_ms``). Nothing is fitted on the grid: the transport constants come from
``tools/bench_wire.py`` and citations (node0sim/config.py ``sim.tcp_*``).

Latency: the kernel here has no netem, so a non-zero latency is software-injected by every live peer
before each RPC message it writes (``swarm.injected_latency_ms``); TCP itself sees no extra RTT there, and
the all-reduce (hivemind's) and the DHT are not delayed. Such points are labelled "(injected)".

Failure scenarios take server ``KILLED`` away once the first trainer logged step ``fail_at_step``: killed
(SIGKILL, the simulator's churn event ``kill``) or cut off (its link down, the simulator's ``crash``).

Writes ``fidelity.md`` (table), ``fidelity.json`` (every point) and ``fidelity.png`` (predicted vs measured
steady tokens/s with y = x, and error per scenario) into ``experiments/results/fidelity/`` or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import RESULTS, run_cell, save_json  # noqa: E402

OUT = RESULTS / "fidelity"
BASE = [
    "experiment=minimal", "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=128", "train.eval_batches=0",
    "wandb.enabled=false",
    "averaging.average_state_every=0", "run_id=fidelity", "network.jitter_ms=0",
    # several processes share 2 cores: the live tests' wider averaging windows keep DHT views consistent
    "averaging.averaging_timeout_s=10", "averaging.matchmaking_time_s=2.5", "averaging.matchmaking_slack_s=1.0",
    "averaging.progress_period_s=1.0",
]


KILLED = "s0p1"
"""The server a failure scenario takes away."""
FAILURES = {"kill": "kill", "vanish": "crash"}
"""Failure modes, by the churn event that stands for each in the simulator's trace. ``kill``: SIGKILL to the server's
process (its namespace's kernel resets its connections); ``vanish``: its link cut (:meth:`swarm.netlab.NetLab.cut`:
no reset, calls to it time out)."""
STEPS_AFTER_FAILURE = 32
"""A failure run's steps after the failure (enough to outlast a ``train.request_timeout_s`` of 30 s and settle)."""


@dataclass(frozen=True)
class Scenario:
    """One grid point: links (Mb/s), one-way latency (ms), compression, pipeline shape, trainers, and whether server
    ``KILLED`` fails (``failure``, one of ``FAILURES``) once the first trainer has logged step ``fail_at_step``."""

    up_mbps: float
    down_mbps: float
    latency_ms: float = 0.0
    compression: str = "none"
    num_stages: int = 2
    peers_per_stage: int = 1
    num_trainers: int = 1
    fail_at_step: int | None = None
    failure: str = "kill"

    def __post_init__(self) -> None:
        if self.failure not in FAILURES:
            raise ValueError(f"failure: {self.failure!r} is not one of {list(FAILURES)}")
        if self.fail_at_step is not None and self.peers_per_stage < 2:
            raise ValueError(f"a failure scenario needs peers_per_stage >= 2 (it takes {KILLED} away)")

    @property
    def name(self) -> str:
        link = f"{self.up_mbps:g}" if self.up_mbps == self.down_mbps else f"{self.up_mbps:g}/{self.down_mbps:g}"
        latency = f", {self.latency_ms:g} ms (injected)" if self.latency_ms else ""
        trainers = f", {self.num_trainers} trainers (async)" if self.num_trainers > 1 else ""
        past = {"kill": "killed", "vanish": "cut off"}[self.failure]
        kill = f", {KILLED} {past} at step {self.fail_at_step}" if self.fail_at_step is not None else ""
        return f"{link} Mb/s{latency}, {self.compression}, {self.num_stages}x{self.peers_per_stage}{trainers}{kill}"

    def overrides(self) -> list[str]:
        trainers = [f"topology.num_trainers={self.num_trainers}", "train.schedule=async"] if self.num_trainers > 1 else []
        return [f"network.up_mbps={self.up_mbps}", f"network.down_mbps={self.down_mbps}", f"network.latency_ms={self.latency_ms}",
                f"compression={self.compression}", f"topology.num_stages={self.num_stages}",
                f"topology.peers_per_stage={self.peers_per_stage}", *trainers]


QUICK = [Scenario(2, 2), Scenario(10, 10), Scenario(50, 50), Scenario(10, 10, compression="subspace")]
FULL = QUICK + [
    Scenario(10, 50), Scenario(10, 10, latency_ms=50), Scenario(10, 10, peers_per_stage=2), Scenario(10, 10, num_stages=3),
    Scenario(2, 2, compression="subspace"), Scenario(50, 50, compression="subspace"), Scenario(50, 10),
    Scenario(10, 10, num_trainers=2), Scenario(10, 10, compression="subspace", num_stages=3, peers_per_stage=2),
    Scenario(1000, 1000),  # compute-bound: the tiny model's calls outweigh its transfers at 1 Gb/s
    Scenario(10, 10, peers_per_stage=2, fail_at_step=8), Scenario(10, 10, peers_per_stage=2, fail_at_step=8, failure="vanish"),
]


def cpu_busy() -> dict[str, tuple[float, float]]:
    """(busy, total) jiffies of the whole machine (``cpu``) and of each core (``cpu0``, ...), from /proc/stat."""
    counts = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu"):
            name, *fields = line.split()
            values = [float(x) for x in fields]
            counts[name] = (sum(values) - values[3] - values[4], sum(values))
    return counts


def cpu_loads(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Busy fraction of the machine and of each core between two :func:`cpu_busy` readings."""
    return {name: (after[name][0] - before[name][0]) / max(1.0, after[name][1] - before[name][1]) for name in before}


def read_step_times(metrics: Path) -> list[float]:
    """When each training step of a live peer's ``metrics.jsonl`` ended (its ``time_s``)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"step"' in line] if metrics.is_file() else []
    return [r["time_s"] for r in records if "step" in r]


def steady_gaps(times: list[float]) -> list[float]:
    """Seconds between consecutive training steps, second half of the run (the steady part)."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return gaps[len(gaps) // 2:]


def recovery_s(times: list[float], kill_s: float, slack: float = 1.5) -> float | None:
    """Seconds from the kill at ``kill_s`` until throughput recovered: until the step after which every step gap is
    within ``slack`` x the median gap of the run's last quarter (the rate with one server fewer). None when the run
    ended before that could be seen (fewer than 4 steps after the kill)."""
    after = [t for t in times if t > kill_s]
    if len(after) < 4:
        return None
    gaps = [b - a for a, b in zip(after, after[1:])]
    settled = statistics.median(gaps[-max(1, len(gaps) // 4):]) * slack
    last_slow = max((i for i, gap in enumerate(gaps) if gap > settled), default=None)
    recovered_at = after[0] if last_slow is None else after[last_slow + 1]
    return recovered_at - kill_s


def quantiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50": values[0] if values else None, "p95": None}
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[18]}


def _fail_after_step(fail: Callable[[], None], metrics: Path, step: int, trainer: subprocess.Popen) -> float | None:
    """``fail()`` as soon as ``metrics`` shows ``step``; the trainer's clock (``time_s``) at the failure, read as that
    step's time (the file is polled every 20 ms, so the failure is at most that much later), or None if the trainer
    ended first."""
    while trainer.poll() is None:
        times = read_step_times(metrics)
        if len(times) >= step:
            fail()
            return times[step - 1]
        time.sleep(0.02)
    return None


def run_live(scenario: Scenario, steps: int, folder: Path, timeout_s: float) -> dict[str, Any]:
    """One live run in the lab: the trainers' summaries and the tokens/s compared (:func:`_live_throughput`), the first
    trainer's step times, shaper byte counts per peer, machine and per-core CPU load and, for a failure scenario, the
    failure and recovery times."""
    from swarm.local import LocalSwarm
    from swarm.netlab import LinkShape, NetLab, exit_on_sigterm

    exit_on_sigterm()
    servers = [f"s{stage}p{k}" for stage in range(scenario.num_stages) for k in range(scenario.peers_per_stage)]
    trainers = [f"trainer{i}" for i in range(scenario.num_trainers)]
    names = ["bootstrap", *servers, *trainers]
    link = LinkShape(scenario.up_mbps, scenario.down_mbps)
    shapes = [LinkShape(None, None)] + [link] * (len(names) - 1)  # the bootstrap only serves the DHT: unshaped
    cores = sorted(os.sched_getaffinity(0))
    overrides = [*BASE, *scenario.overrides(), f"train.steps={steps}"]
    latency = f"swarm.injected_latency_ms={scenario.latency_ms}"  # LocalSwarm passes no swarm.* overrides on: given per peer
    with NetLab("n0fid-", shapes) as lab:
        def place(name: str) -> tuple[str, list[str]]:
            index = names.index(name)
            return lab.address(index), lab.command(index, [], [cores[index % len(cores)]])

        with LocalSwarm(overrides, folder, extra_env={"NODE0SIM_RUNTIME_DIR": str(folder / "rt")}, place=place) as swarm:
            swarm.start_bootstrap()
            for name in servers:
                swarm.start_server(name, int(name[1:].split("p")[0]), latency)
            cpu_before = cpu_busy()
            processes = [swarm.start(name, "trainer", f"hydra.run.dir={folder / name}", f"swarm.trainer_index={i}", latency)
                         for i, name in enumerate(trainers)]
            started = time.monotonic()
            metrics = folder / "trainer0" / "metrics.jsonl"
            kill_s = None
            if scenario.fail_at_step:
                fail = (lambda: swarm.kill(KILLED)) if scenario.failure == "kill" else (lambda: lab.cut(names.index(KILLED)))
                kill_s = _fail_after_step(fail, metrics, scenario.fail_at_step, processes[0])
            codes = []
            for process in processes:
                try:
                    codes.append(process.wait(timeout=max(1.0, timeout_s - (time.monotonic() - started))))
                except subprocess.TimeoutExpired:
                    codes.append(None)
            wall = time.monotonic() - started
            cpu = cpu_loads(cpu_before, cpu_busy())
            wire = {name: lab.shaped_bytes(i) for i, name in enumerate(names) if name != "bootstrap"}
    summaries = [json.loads((folder / name / "summary.json").read_text())
                 if code == 0 and (folder / name / "summary.json").is_file() else None for name, code in zip(trainers, codes)]
    times = read_step_times(metrics)
    complete = all(summaries) and not (scenario.fail_at_step and kill_s is None)
    return {"summary": summaries[0], "trainer_summaries": summaries, "exit_code": codes[0], "exit_codes": codes, "wall_s": wall,
            "tokens_per_s_compared": _live_throughput(summaries) if complete else None,
            "cpu_load": cpu.pop("cpu"), "core_loads": cpu, "step_s": quantiles(steady_gaps(times)), "wire_bytes": wire,
            "kill_s": kill_s, "recovery_s": recovery_s(times, kill_s) if kill_s is not None else None}


def run_sim(scenario: Scenario, steps: int, transport: str, utilization: float, lab: dict[str, float],
            folder: Path) -> dict[str, Any]:
    """The simulator on the same settings, its DHT operations and the transport's round trip at the lab's own
    (``lab``: :func:`tools.bench_wire.lab_timings`; the lab's latency, if any, is injected per message, off the path);
    its summary, the tokens/s compared (steady; with several trainers, over the whole run), step times and, for a
    failure scenario, the failure (a churn trace event for ``KILLED`` when a run without it ends step
    ``fail_at_step``) and recovery times."""
    settings = [*BASE, *scenario.overrides(), f"train.steps={steps}", "sim.gpu=rtx3090", f"sim.utilization={utilization}",
                f"sim.transport={transport}", f"sim.dht_latency_ms={1000 * lab['dht_s']}", f"sim.tcp_rtt_ms={1000 * lab['rtt_s']}"]
    summary, records = run_cell(folder, *settings)
    times = [r["time_s"] for r in records if "step" in r]
    kill_s = None
    if scenario.fail_at_step:
        kill_s = times[scenario.fail_at_step - 1]
        trace = folder / "failure.csv"
        trace.write_text(f"time,peer,event\n{kill_s!r},{KILLED},{FAILURES[scenario.failure]}\n")
        summary, records = run_cell(folder / "killed", *settings, "churn=trace", f"churn.trace_file={trace}")
        times = [r["time_s"] for r in records if "step" in r]
    compared = summary["tokens_per_s_steady"] if scenario.num_trainers == 1 else summary["tokens_per_s"]
    return {"summary": summary, "tokens_per_s_compared": compared, "step_s": quantiles(steady_gaps(times)),
            "kill_s": kill_s, "recovery_s": recovery_s(times, kill_s) if kill_s is not None else None}


def _on_one_core(measure: Callable[[], float]) -> float:
    """``measure()`` pinned to one core with one torch thread, as a live peer runs."""
    import torch

    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure()
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, cores)


def live_matmul_rate() -> float:
    """FLOP/s of fp32 matmuls on one thread, as each live peer measures and announces it."""
    import torch

    from swarm.roles import measured_flops

    return _on_one_core(lambda: measured_flops(torch.device("cpu")))


def stage_call_rate(scenario: Scenario, repeats: int = 5) -> float:
    """FLOP/s this CPU achieves on one micro-batch's stage calls (forward through all but the last stage, the tail
    call, backward back to the head), counting the FLOPs the simulator charges for those calls."""
    import torch

    from node0sim.app import compose_run_config
    from node0sim.experiment import model_config, stage_computes, vocabulary_size

    run = compose_run_config(*BASE, *scenario.overrides())
    stages = stage_computes(run, model_config(run, vocabulary_size(run)), "cpu")
    ids = torch.randint(0, vocabulary_size(run), (run.train.micro_batch_size, run.train.seq_len))

    def micro_batch() -> float:
        flops, x, inputs = 0.0, ids, []
        for stage in stages[:-1]:
            inputs.append(x)
            flops += stage.forward_flops(x)
            x = stage.forward(x, ids)
        flops += stages[-1].backward_flops(x)  # what a tail call is charged (forward + backward)
        _, grad = stages[-1].tail(x, ids, ids)
        for stage, stage_input in zip(reversed(stages[:-1]), reversed(inputs)):
            flops += stage.backward_flops(stage_input)
            grad = stage.backward(stage_input, ids, grad)
        return flops

    def measure() -> float:
        micro_batch()  # warm-up
        times, flops = [], 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            flops = micro_batch()
            times.append(time.perf_counter() - start)
        return flops / statistics.median(times)

    return _on_one_core(measure)


def error(predicted: float | None, measured: float | None) -> float | None:
    """Relative error of the prediction (positive: the simulator is optimistic)."""
    if predicted is None or not measured:
        return None
    return predicted / measured - 1


def _live_throughput(summaries: list[dict[str, Any]]) -> float:
    """What a live run is compared on: one trainer's steady tokens/s; with several, their tokens over the longest one's
    training time (each trainer's steady window is on its own clock, so their steady rates cannot be summed)."""
    if len(summaries) == 1:
        return summaries[0]["tokens_per_s_steady"]
    return sum(s["tokens"] for s in summaries) / max(s["sim_time_s"] for s in summaries)


def steady(result: dict[str, Any]) -> float | None:
    """The tokens/s a run is compared on: steady, or over the whole run with several trainers (``_live_throughput``)."""
    return result.get("tokens_per_s_compared")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _num(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_table(points: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# Fidelity: simulator vs live swarm on kernel-shaped links", "",
        "Live peers in network namespaces, tbf-shaped up/down links, pinned to cores, one torch thread each; the simulator's "
        "GPU at the FLOP/s one thread achieves on the scenario's stage calls, its DHT operation at the time two lab peers "
        "on the scenario's links take for one and the transport's RTT at their TCP connect time (all measured right before "
        "each live run). "
        "Error = predicted / measured - 1 (steady tokens/s; with two trainers, all tokens over the training time). "
        "Step time: seconds between training steps (of the first trainer), second half of the run. "
        "Request p50: per method, call to reply of the trainers' successful requests, live / tcp ms (tcp error). "
        "Recovery (failure scenarios): seconds from the failure until every later step gap is within 1.5x the run's final "
        "median gap. CPU load: the whole machine's during the live run (each core's in brackets).", "",
        "| scenario | stage-call GFLOP/s | DHT op / RTT ms | live tok/s | fluid tok/s | fluid error | tcp tok/s | tcp error "
        "| live step p50/p95 s | tcp step p50/p95 s | request p50 live / tcp ms | recovery live / fluid / tcp s | live CPU load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        live, fluid, tcp = p["live"], p["fluid"], p["tcp"]
        recovery = " / ".join(_num(r["recovery_s"], ".1f") for r in (live, fluid, tcp)) if p["settings"]["fail_at_step"] else ""
        lab = f"{_num(1000 * p['lab']['dht_s'], '.1f')} / {_num(1000 * p['lab']['rtt_s'], '.2f')}"
        lines.append(
            f"| {p['scenario']} | {p['stage_call_flops'] / 1e9:.1f} | {lab} "
            f"| {_num(steady(live))} | {_num(steady(fluid))} | {_pct(p['error_fluid'])} | {_num(steady(tcp))} "
            f"| {_pct(p['error_tcp'])} | {_num(live['step_s']['p50'], '.2f')}/{_num(live['step_s']['p95'], '.2f')} "
            f"| {_num(tcp['step_s']['p50'], '.2f')}/{_num(tcp['step_s']['p95'], '.2f')} | {_requests(p)} | {recovery} "
            f"| {_num(100 * live['cpu_load'], '.0f')}% ({_cores(live)}) |"
        )
    path.write_text("\n".join(lines) + "\n")


def _cores(live: dict[str, Any]) -> str:
    return " / ".join(f"{100 * load:.0f}%" for _, load in sorted(live.get("core_loads", {}).items()))


def _requests(point: dict[str, Any]) -> str:
    return "; ".join(f"{method} {_num(None if live is None else 1000 * live)} / {_num(None if tcp is None else 1000 * tcp)} "
                     f"({_pct(point['latency_error_tcp'].get(method))})" for method, (live, tcp) in request_p50s(point).items())


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (scatter, bars) = plt.subplots(1, 2, figsize=(12, 5))
    measured_all = []
    for transport, marker in (("fluid", "o"), ("tcp", "s")):
        pairs = [(steady(p["live"]), steady(p[transport])) for p in points if steady(p["live"]) and steady(p[transport])]
        if pairs:
            scatter.scatter([m for m, _ in pairs], [q for _, q in pairs], marker=marker, label=f"sim.transport={transport}")
            measured_all += [v for pair in pairs for v in pair]
    if measured_all:
        top = max(measured_all) * 1.1
        scatter.plot([0, top], [0, top], "k--", label="y = x")
    scatter.set(xlabel="measured steady tokens/s (live, shaped)", ylabel="predicted steady tokens/s (simulator)")
    scatter.legend()
    names = [p["scenario"] for p in points]
    x = range(len(points))
    for offset, transport in ((-0.2, "fluid"), (0.2, "tcp")):
        bars.bar([i + offset for i in x], [100 * (p[f"error_{transport}"] or 0) for p in points], width=0.4, label=transport)
    bars.axhline(0, color="k")
    bars.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    bars.set(ylabel="error of the prediction, %")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def simulate(point: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """``point`` (its live run and the calibration measured before it) with both simulator runs and their errors."""
    scenario, steps = Scenario(**point["settings"]), point["steps"]
    fluid = run_sim(scenario, steps, "fluid", point["utilization"], point["lab"], scratch / "fluid")
    tcp = run_sim(scenario, steps, "tcp", point["utilization"], point["lab"], scratch / "tcp")
    live = point["live"]
    simulated = {**point, "fluid": fluid, "tcp": tcp, "error_fluid": error(steady(fluid), steady(live)),
                 "error_tcp": error(steady(tcp), steady(live))}
    return {**simulated, "latency_error_tcp": {method: error(tcp_p50, live_p50)
                                               for method, (live_p50, tcp_p50) in request_p50s(simulated).items()}}


def request_p50s(point: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """Per method: the live and the ``tcp`` runs' per-request latency p50 (None where a run did not measure it)."""
    def p50s(result: dict[str, Any]) -> dict[str, float]:
        latency = (result.get("summary") or {}).get("request_latency_s") or {}
        return {method: q["p50"] for method, q in latency.items()}

    live, tcp = p50s(point["live"]), p50s(point["tcp"]) if "tcp" in point else {}
    return {method: (live.get(method), tcp.get(method)) for method in sorted(set(live) | set(tcp))}


def measure(scenario: Scenario, steps: int, timeout_s: float, folder: Path) -> dict[str, Any]:
    """One grid point's calibration (stage-call FLOP/s, matmul FLOP/s, the lab's DHT and RTT) and its live run."""
    from node0sim.sim.gpus import gpu_profile
    from tools.bench_wire import lab_timings

    matmul, calls = live_matmul_rate(), stage_call_rate(scenario)
    lab = lab_timings(scenario.up_mbps, scenario.down_mbps)
    utilization = calls / gpu_profile("rtx3090").peak_flops
    print(f"{scenario.name}: stage calls {calls / 1e9:.2f} GFLOP/s (matmul {matmul / 1e9:.2f}) on one thread: "
          f"sim.utilization={utilization:.6f} of an rtx3090; one DHT operation {lab['dht_s'] * 1000:.1f} ms, "
          f"RTT {lab['rtt_s'] * 1000:.2f} ms", flush=True)
    run_steps = max(steps, scenario.fail_at_step + STEPS_AFTER_FAILURE) if scenario.fail_at_step else steps
    return {"scenario": scenario.name, "settings": asdict(scenario), "steps": run_steps, "stage_call_flops": calls,
            "matmul_flops": matmul, "utilization": utilization, "lab": lab, "live": run_live(scenario, run_steps, folder, timeout_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small grid (a few points, minutes)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 8 quick, 16 full)")
    parser.add_argument("--only", default=None, help="comma-separated indices of the grid's scenarios to run (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a live trainer may run")
    parser.add_argument("--resim", type=Path, nargs="+", default=None, metavar="FIDELITY_JSON",
                        help="no live runs: the simulator again on these files' points, with their stored calibration "
                             "(a later file's point replaces an earlier one of the same scenario)")
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="n0fid"))
    points: list[dict[str, Any]] = []
    try:
        if options.resim:
            stored = {p["scenario"]: p for path in options.resim for p in json.loads(path.read_text())["points"]}
            for index, point in enumerate(stored.values()):
                points.append(simulate(point, scratch / str(index)))
                _report(points[-1])
                save_json(options.out / "fidelity.json", {"points": points})
        else:
            from swarm.netlab import unavailable_reason

            reason = unavailable_reason()
            if reason:
                sys.exit(f"fidelity.py needs the shaped-link lab: {reason}")
            scenarios = QUICK if options.quick else FULL
            if options.only:
                scenarios = [scenarios[int(i)] for i in options.only.split(",")]
            steps = options.steps or (8 if options.quick else 16)
            for index, scenario in enumerate(scenarios):
                print(f"[{index + 1}/{len(scenarios)}] ", end="")
                points.append(simulate(measure(scenario, steps, options.timeout, scratch / f"live{index}"), scratch / str(index)))
                _report(points[-1])
                save_json(options.out / "fidelity.json", {"points": points})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_table(points, options.out / "fidelity.md")
    plot(points, options.out / "fidelity.png")
    print(f"wrote {options.out / 'fidelity.md'}, fidelity.json and fidelity.png")


def _report(point: dict[str, Any]) -> None:
    print(f"  live {_num(steady(point['live']))} tok/s; fluid {_num(steady(point['fluid']))} ({_pct(point['error_fluid'])}); "
          f"tcp {_num(steady(point['tcp']))} ({_pct(point['error_tcp'])})", flush=True)


if __name__ == "__main__":
    main()
