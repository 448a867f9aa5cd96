"""Matmul efficiency vs size: measured on this machine's device, or fitted to a published table.

    .venv/bin/python tools/bench_compute.py [--device cpu|cuda] [--dtype float32 bfloat16 tf32] [--gpu h100]
    .venv/bin/python tools/bench_compute.py --table tools/data/h100_matmul_xla.csv --gpu h100
    .venv/bin/python tools/bench_compute.py --stage node0_8b --seq-len 4096 --gpu h100 [--dtype bfloat16]

Each matmul [m, k] x [k, n] (batched ``batch`` times) of F = 2 batch m k n FLOPs is timed (CUDA events after
warm-up on a GPU, the median of ``--repeats``; wall clock on a CPU, the fastest), and the roofline model's curve
(``node0sim.sim.gpus.MatmulCurve``) is fitted to the times:

    t(F) = fixed_s + F / (max_efficiency x peak),  i.e.  efficiency(F) = max_efficiency x F / (F + max_efficiency x peak x fixed_s)

by least squares on the relative error of t (linear in fixed_s and 1 / (max_efficiency x peak)). ``peak`` is the
``--gpu`` profile's datasheet peak for the dtype; without ``--gpu`` (a CPU) the fitted asymptotic rate is printed
instead of an efficiency. ``--table`` fits a CSV of published measurements (``batch,m,n,k,<dtype>_tflops`` columns)
instead of timing anything: that is how the constants in ``node0sim/sim/gpus.py`` were obtained. ``--stage MODEL``
times one body stage of that model (one layer, as a server runs it: a forward without autograd, and a recomputed
forward plus backward) and prints what the flat and roofline models charge for the same calls on ``--gpu``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from node0sim.model.costs import stage_forward_cost, stage_training_cost
from node0sim.model.llama import ModelConfig, build_stages
from node0sim.sim.gpus import FlatCompute, GPUProfile, RooflineCompute, gpu_profile

SQUARE_SIZES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def fit_curve(flops: list[float], seconds: list[float]) -> tuple[float, float]:
    """``(fixed_s, achieved FLOP/s)`` of ``t = fixed_s + F / rate`` fitted on the relative error of t."""
    f, t = np.asarray(flops, float), np.asarray(seconds, float)
    (fixed_s, inverse_rate), *_ = np.linalg.lstsq(np.stack([1 / t, f / t], axis=1), np.ones_like(t), rcond=None)
    return max(0.0, float(fixed_s)), 1.0 / float(inverse_rate)


def time_matmul(batch: int, m: int, k: int, n: int, dtype: str, device: torch.device, repeats: int) -> float:
    """Seconds of one (batched) matmul on ``device``: the median repeat on a GPU, the fastest on a CPU (whose
    slower repeats are other processes taking the core)."""
    torch_dtype = torch.float32 if dtype in ("float32", "tf32") else getattr(torch, dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    a = torch.randn(batch, m, k, dtype=torch_dtype, device=device)
    b = torch.randn(batch, k, n, dtype=torch_dtype, device=device)
    for _ in range(3):
        torch.bmm(a, b)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.bmm(a, b)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            torch.bmm(a, b)
            times.append(time.perf_counter() - began)
    return statistics.median(times) if device.type == "cuda" else min(times)


def read_table(path: Path, dtype: str) -> list[tuple[tuple[int, int, int, int], float]]:
    """``((batch, m, k, n), seconds)`` rows of a published table of achieved TFLOP/s."""
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    rows = []
    for row in csv.DictReader(lines):
        shape = (int(row["batch"]), int(row["m"]), int(row["k"]), int(row["n"]))
        rows.append((shape, 2.0 * np.prod(shape) / (float(row[f"{dtype}_tflops"]) * 1e12)))
    return rows


def report(label: str, rows: list[tuple[tuple[int, int, int, int], float]], peak: float | None) -> None:
    """Print the measured points, the fitted curve at each, and the curve's constants."""
    flops = [2.0 * float(np.prod(shape)) for shape, _ in rows]
    fixed_s, rate = fit_curve(flops, [t for _, t in rows])
    print(f"\n{label}: fixed_s = {fixed_s * 1e6:.2f} us, asymptotic rate {rate / 1e12:.2f} TFLOP/s"
          + (f" = max_efficiency {rate / peak:.3f} x peak {peak / 1e12:g} TFLOP/s" if peak else ""))
    print(f"{'batch x m x k x n':>24} {'GFLOP':>10} {'measured':>12} {'curve':>12}" + ("  (efficiency)" if peak else "  (TFLOP/s)"))
    scale = peak or 1e12
    errors = []
    for (shape, seconds), f in sorted(zip(rows, flops), key=lambda item: item[1]):
        curve = f / (fixed_s + f / rate)
        errors.append(abs(np.log(curve * seconds / f)))
        print(f"{' x '.join(map(str, shape)):>24} {f / 1e9:10.3f} {f / seconds / scale:12.4f} {curve / scale:12.4f}")
    print(f"curve vs measured: rms log error {float(np.sqrt(np.mean(np.square(errors)))):.3f}, max {max(errors):.3f}")


def bench_stage(model: str, batch: int, seq_len: int, dtype: str, device: torch.device, repeats: int,
                profile: GPUProfile | None) -> None:
    """Time a body stage's forward and training calls; print them next to the cost models' charges."""
    from node0sim.app import compose_run_config

    overrides = (f"model={model}", "model.vocab_size=257", "model.n_layers=3", f"model.max_seq_len={seq_len}", "sim.numerics=false",
                 "topology.num_stages=3", f"train.seq_len={seq_len}")
    cfg = ModelConfig(**compose_run_config(*overrides).model)
    torch_dtype = torch.float32 if dtype in ("float32", "tf32") else getattr(torch, dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    module = build_stages(cfg, 3, seed=0)[1].to(device=device, dtype=torch_dtype)
    x = torch.randn(batch, seq_len, cfg.dim, dtype=torch_dtype, device=device)

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def training() -> None:
        module(x.detach().requires_grad_(True)).backward(torch.ones_like(x))

    def seconds(call) -> float:
        call()  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - began)
        return statistics.median(times) if device.type == "cuda" else min(times)

    costs = {"forward": stage_forward_cost(cfg, range(1, 2), False, False, batch, seq_len),
             "forward + backward": stage_training_cost(cfg, range(1, 2), False, False, batch, seq_len)}
    measured = {"forward": seconds(forward), "forward + backward": seconds(training)}
    print(f"\nmodel={model} body stage (one layer, d={cfg.dim}), {batch} x {seq_len} tokens, {dtype} on {device}")
    header = f"{'call':>20} {'GFLOP':>9} {'measured ms':>12}"
    print(header + (f" {'flat 0.4 ms':>12} {'roofline ms':>12}  (on {profile.name})" if profile else ""))
    for name, cost in costs.items():
        line = f"{name:>20} {cost.flops / 1e9:9.1f} {measured[name] * 1e3:12.3f}"
        if profile:
            flat = FlatCompute(profile.peak(dtype) * 0.4).seconds(cost)
            line += f" {flat * 1e3:12.3f} {RooflineCompute(profile, dtype).seconds(cost) * 1e3:12.3f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, help="fit a CSV of published measurements instead of timing")
    parser.add_argument("--gpu", help="profile whose datasheet peak the efficiencies are relative to (node0sim/sim/gpus.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", default=None, help="float32, tf32 (CUDA), bfloat16")
    parser.add_argument("--max-size", type=int, default=None, help="largest square size timed (default 8192 on CUDA, 1024 on CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--stage", metavar="MODEL", help="time a body stage of conf/model/MODEL.yaml instead (tiny, node0_8b)")
    parser.add_argument("--batch", type=int, default=1, help="--stage: sequences per call")
    parser.add_argument("--seq-len", type=int, default=128, help="--stage: tokens per sequence")
    args = parser.parse_args()
    profile = gpu_profile(args.gpu) if args.gpu else None
    if args.stage:
        device = torch.device(args.device)
        for dtype in args.dtype or (("bfloat16",) if device.type == "cuda" else ("float32",)):
            bench_stage(args.stage, args.batch, args.seq_len, dtype, device, args.repeats, profile)
        return
    if args.table:
        for dtype in args.dtype or ("bfloat16", "tf32"):
            report(f"{args.table.name}, {dtype}", read_table(args.table, dtype), profile.peak(dtype) if profile else None)
        return
    device = torch.device(args.device)
    dtypes = args.dtype or (("float32", "tf32", "bfloat16") if device.type == "cuda" else ("float32",))
    largest = args.max_size or (8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    for dtype in dtypes:
        rows = [((1, n, n, n), time_matmul(1, n, n, n, dtype, device, args.repeats)) for n in SQUARE_SIZES if n <= largest]
        report(f"{name}, {dtype}", rows, profile.peak(dtype) if profile else None)


if __name__ == "__main__":
    main()
