"""The simulator held against a live swarm on kernel-shaped links (needs root: swarm/netlab.py).

    python experiments/fidelity.py [--quick] [--out DIR] [--steps N] [--only 4,5]

Every scenario runs twice: live (bootstrap, stage servers and one trainer as real ``node0sim backend=swarm``
processes, each in its own network namespace with tbf-shaped uplink and downlink, pinned round-robin to the
machine's cores, one torch thread each) and on the simulator with the same settings, once with
``sim.transport=fluid`` and once with ``sim.transport=tcp``. The simulator's "GPU" runs at the FLOP/s this
CPU achieves on the stages' own calls (:func:`stage_call_rate`: one micro-batch's forward, tail and backward
calls through every stage of the scenario's model, one thread, pinned to one core, the FLOPs the simulator
charges for them over their median time), measured right before each scenario's live run; the matmul rate a
live peer announces (``swarm.roles.measured_flops``) is reported beside it. Nothing is fitted on the grid: the
transport constants come from ``tools/bench_wire.py`` and citations (node0sim/config.py ``sim.tcp_*``).

Latency: the kernel here has no netem, so a non-zero latency is software-injected by every live peer
before each RPC message it writes (``swarm.injected_latency_ms``); TCP itself sees no extra RTT there, and
the all-reduce (hivemind's) is not delayed. Such points are labelled "(injected)".

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


@dataclass(frozen=True)
class Scenario:
    """One grid point: links (Mb/s), one-way latency (ms), compression, pipeline shape."""

    up_mbps: float
    down_mbps: float
    latency_ms: float = 0.0
    compression: str = "none"
    num_stages: int = 2
    peers_per_stage: int = 1

    @property
    def name(self) -> str:
        link = f"{self.up_mbps:g}" if self.up_mbps == self.down_mbps else f"{self.up_mbps:g}/{self.down_mbps:g}"
        latency = f", {self.latency_ms:g} ms (injected)" if self.latency_ms else ""
        return f"{link} Mb/s{latency}, {self.compression}, {self.num_stages}x{self.peers_per_stage}"

    def overrides(self) -> list[str]:
        return [f"network.up_mbps={self.up_mbps}", f"network.down_mbps={self.down_mbps}", f"network.latency_ms={self.latency_ms}",
                f"compression={self.compression}", f"topology.num_stages={self.num_stages}",
                f"topology.peers_per_stage={self.peers_per_stage}"]


QUICK = [Scenario(2, 2), Scenario(10, 10), Scenario(50, 50), Scenario(10, 10, compression="subspace")]
FULL = QUICK + [
    Scenario(10, 50), Scenario(10, 10, latency_ms=50), Scenario(10, 10, peers_per_stage=2), Scenario(10, 10, num_stages=3),
    Scenario(2, 2, compression="subspace"), Scenario(50, 50, compression="subspace"),
]


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (/proc/stat), for the load during a live run."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def step_times(metrics: Path) -> list[float]:
    """Seconds between consecutive training steps, second half of the run (the steady part)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"step"' in line] if metrics.is_file() else []
    times = [r["time_s"] for r in records if "step" in r]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return gaps[len(gaps) // 2:]


def quantiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50": values[0] if values else None, "p95": None}
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[18]}


def run_live(scenario: Scenario, steps: int, folder: Path, timeout_s: float) -> dict[str, Any]:
    """One live run in the lab; its summary, step times, shaper byte counts per peer and machine CPU load."""
    from swarm.local import LocalSwarm
    from swarm.netlab import LinkShape, NetLab, exit_on_sigterm

    exit_on_sigterm()
    servers = [f"s{stage}p{k}" for stage in range(scenario.num_stages) for k in range(scenario.peers_per_stage)]
    names = ["bootstrap", *servers, "trainer0"]
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
            busy0, total0 = cpu_busy()
            trainer = swarm.start("trainer0", "trainer", f"hydra.run.dir={folder / 'trainer'}", latency)
            started = time.monotonic()
            try:
                code = trainer.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            wall = time.monotonic() - started
            busy1, total1 = cpu_busy()
            wire = {name: lab.shaped_bytes(i) for i, name in enumerate(names) if name != "bootstrap"}
    summary_path = folder / "trainer" / "summary.json"
    summary = json.loads(summary_path.read_text()) if code == 0 and summary_path.is_file() else None
    return {"summary": summary, "exit_code": code, "wall_s": wall, "cpu_load": (busy1 - busy0) / max(1.0, total1 - total0),
            "step_s": quantiles(step_times(folder / "trainer" / "metrics.jsonl")), "wire_bytes": wire}


def run_sim(scenario: Scenario, steps: int, transport: str, utilization: float, folder: Path) -> dict[str, Any]:
    """The simulator on the same settings; its summary and step times."""
    summary, records = run_cell(folder, *BASE, *scenario.overrides(), f"train.steps={steps}", "sim.gpu=rtx3090",
                                f"sim.utilization={utilization}", f"sim.transport={transport}")
    times = [r["time_s"] for r in records if "step" in r]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"summary": summary, "step_s": quantiles(gaps[len(gaps) // 2:])}


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


def steady(result: dict[str, Any]) -> float | None:
    return result["summary"]["tokens_per_s_steady"] if result.get("summary") else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _num(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_table(points: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# Fidelity: simulator vs live swarm on kernel-shaped links", "",
        "Live peers in network namespaces, tbf-shaped up/down links, pinned to cores, one torch thread each; the simulator's "
        "GPU at the FLOP/s one thread achieves on the scenario's stage calls (measured before each live run). "
        "Error = predicted / measured - 1 (steady tokens/s). "
        "Step time: seconds between training steps, second half of the run. "
        "CPU load: the whole machine's (shared with other work) during the live run.", "",
        "| scenario | stage-call GFLOP/s | live tok/s | fluid tok/s | fluid error | tcp tok/s | tcp error | live step p50/p95 s "
        "| tcp step p50/p95 s | live CPU load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        live, fluid, tcp = p["live"], p["fluid"], p["tcp"]
        lines.append(
            f"| {p['scenario']} | {p['stage_call_flops'] / 1e9:.1f} | {_num(steady(live))} | {_num(steady(fluid))} "
            f"| {_pct(p['error_fluid'])} | {_num(steady(tcp))} "
            f"| {_pct(p['error_tcp'])} | {_num(live['step_s']['p50'], '.2f')}/{_num(live['step_s']['p95'], '.2f')} "
            f"| {_num(tcp['step_s']['p50'], '.2f')}/{_num(tcp['step_s']['p95'], '.2f')} | {_num(100 * live['cpu_load'], '.0f')}% |"
        )
    path.write_text("\n".join(lines) + "\n")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small grid (a few points, minutes)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 8 quick, 16 full)")
    parser.add_argument("--only", default=None, help="comma-separated indices of the grid's scenarios to run (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a live trainer may run")
    options = parser.parse_args()
    from swarm.netlab import unavailable_reason

    reason = unavailable_reason()
    if reason:
        sys.exit(f"fidelity.py needs the shaped-link lab: {reason}")
    scenarios = QUICK if options.quick else FULL
    if options.only:
        scenarios = [scenarios[int(i)] for i in options.only.split(",")]
    steps = options.steps or (8 if options.quick else 16)
    options.out.mkdir(parents=True, exist_ok=True)
    from node0sim.sim.gpus import gpu_profile

    peak = gpu_profile("rtx3090").peak_flops
    points = []
    scratch = Path(tempfile.mkdtemp(prefix="n0fid"))
    try:
        for index, scenario in enumerate(scenarios):
            matmul, calls = live_matmul_rate(), stage_call_rate(scenario)
            utilization = calls / peak
            print(f"[{index + 1}/{len(scenarios)}] {scenario.name}: stage calls {calls / 1e9:.2f} GFLOP/s (matmul {matmul / 1e9:.2f}) "
                  f"on one thread: sim.utilization={utilization:.6f} of an rtx3090", flush=True)
            live = run_live(scenario, steps, scratch / f"live{index}", options.timeout)
            fluid = run_sim(scenario, steps, "fluid", utilization, scratch / f"fluid{index}")
            tcp = run_sim(scenario, steps, "tcp", utilization, scratch / f"tcp{index}")
            point = {"scenario": scenario.name, "settings": asdict(scenario), "steps": steps, "live": live,
                     "stage_call_flops": calls, "matmul_flops": matmul, "utilization": utilization,
                     "fluid": fluid, "tcp": tcp, "error_fluid": error(steady(fluid), steady(live)),
                     "error_tcp": error(steady(tcp), steady(live))}
            print(f"  live {_num(steady(live))} tok/s; fluid {_num(steady(fluid))} ({_pct(point['error_fluid'])}); "
                  f"tcp {_num(steady(tcp))} ({_pct(point['error_tcp'])})", flush=True)
            points.append(point)
            save_json(options.out / "fidelity.json", {"points": points})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_table(points, options.out / "fidelity.md")
    plot(points, options.out / "fidelity.png")
    print(f"wrote {options.out / 'fidelity.md'}, fidelity.json and fidelity.png")


if __name__ == "__main__":
    main()
