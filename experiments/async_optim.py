"""Asynchronous pipeline optimizers (issue #15; Ajanthan et al., "Nesterov Method for Asynchronous Pipeline
Parallel Optimization", ICML 2025) on the tiny model, 8 stages, with a delay made real on purpose.

    .venv/bin/python experiments/async_optim.py [--quick] [--variants sync_adamw,async_adamw,...] [--seeds N]
                                                [--out DIR] [extra Hydra overrides...]

Every cell is ``experiment=async_optim`` (conf/experiment/async_optim.yaml: why its numbers) plus the variant's
overrides, for each seed. Writes ``async_optim.md`` (variant, final train loss and val loss mean +- std over seeds,
measured mean delay per stage), ``async_optim.json`` (every cell's summary and curve) and ``async_optim.png``
(loss vs steps, tokens and virtual time, with each variant's measured delay per stage in its label and panel).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, run_cell, save_json

from node0sim.metrics import read_complete_summary
from node0sim.reporting import markdown_table, pyplot, save_figure

VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sync_adamw": ("sync AdamW", ("train.schedule=sync",)),
    "async_adamw": ("async AdamW", ()),
    "async_nesterov": ("async Nesterov", ("optim=nesterov_async",)),
    # NAdam's momentum ramp (psi 0.004) leaves mu near 0.5 for a 300-step run; psi 0.5 reaches 0.93 by step 100
    "async_nesterov_fast_ramp": ("async Nesterov, momentum_decay 0.5", ("optim=nesterov_async", "optim.momentum_decay=0.5")),
    "async_nag": ("async NAG, (1 - gamma) discount", ("optim=nag_delay", "optim.nag_discount=true")),
    "async_nag_no_discount": ("async NAG, no discount", ("optim=nag_delay", "optim.nag_discount=false")),
    "async_adamw_stashing": ("async AdamW + weight stashing", ("topology.weight_stashing=true",)),
}
QUICK_STEPS = 60
TAIL_STEPS = 10
"""The final train loss is the mean of the last this many step records (one seed's noise)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "async_optim")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_STEPS} steps (a smoke test)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the cells that already have a complete summary.json (resume, or split variants over processes)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every run")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    seeds = range(1 if args.quick else args.seeds)
    extra = [f"train.steps={QUICK_STEPS}"] * args.quick + args.overrides
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the same numbers on every machine (a run's float reductions depend on the thread count)

    cells: dict[str, list[dict]] = {}
    for name in names:
        label, overrides = VARIANTS[name]
        print(f"{label}:", flush=True)
        cells[name] = []
        for seed in seeds:
            cell = args.out / "cells" / name / f"seed{seed}"
            done = _done(cell) if args.reuse else None
            summary, records = done or run_cell(cell, "experiment=async_optim", f"seed={seed}", *overrides, *extra)
            curve = [(r["step"], r["tokens"], r["time_s"], r["loss"]) for r in records if "step" in r]
            cells[name].append(summary | {"curve": curve})

    report = _report(cells, seeds)
    (args.out / "async_optim.md").write_text(report)
    save_json(args.out / "async_optim.json", cells)
    plot(args.out / "async_optim.png", cells)
    print(report)


def _done(cell: Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """A finished cell's summary and metric records (None if it has not finished)."""
    summary = read_complete_summary(cell)
    if summary is None:
        return None
    return summary, [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def _delays(runs: list[dict]) -> list[float]:
    """Each stage's measured mean delay, averaged over the seeds."""
    return [statistics.mean(stage) for stage in zip(*(run["delay_per_stage"] for run in runs))]


def _report(cells: dict[str, list[dict]], seeds: range) -> str:
    rows = []
    for name, runs in cells.items():
        final = [statistics.mean(loss for *_, loss in run["curve"][-TAIL_STEPS:]) for run in runs]
        rows.append([
            VARIANTS[name][0], _mean_std(final), _mean_std([run["val_loss"] for run in runs]),
            " ".join(f"{d:.1f}" for d in _delays(runs)),
        ])
    table = markdown_table(
        [f"variant ({len(seeds)} seed(s))", f"train loss (last {TAIL_STEPS} steps)", "val loss",
         "measured mean delay per stage (head ... tail)"],
        rows,
    )
    first = next(iter(cells.values()))[0]
    return (
        f"# Asynchronous pipeline optimizers: tiny model, {first['num_stages']} stages, {first['steps']} steps, "
        f"{first['tokens']:,} tokens per run\n\n"
        "Delay: epochs (updates of the stage) between a micro-batch's forward and its backward, as the stage servers "
        "measured it (`delay_per_stage` in summary.json); the tail's is 0 by construction (one fused call).\n\n" + table
    )


def plot(path: Path, cells: dict[str, list[dict]]) -> None:
    """Loss (mean over seeds) against steps, tokens and virtual time; the measured delay per stage of each variant."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    for name, runs in cells.items():
        delays = _delays(runs)
        label = f"{VARIANTS[name][0]} (delay {' '.join(f'{d:.1f}' for d in delays)})"
        length = min(len(run["curve"]) for run in runs)
        steps, tokens, times, losses = ([statistics.mean(r["curve"][k][i] for r in runs) for k in range(length)] for i in range(4))
        for ax, x in zip(axes[:3], (steps, tokens, times)):
            ax.plot(x, losses, label=label, linewidth=1.2)
        axes[3].plot(range(len(delays)), delays, marker="o", label=VARIANTS[name][0])
    for ax, xlabel in zip(axes[:3], ("steps", "tokens", "virtual time (s)")):
        ax.set(xlabel=xlabel, ylabel="training loss (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[3].set(xlabel="stage", ylabel="measured mean delay (updates)", title="delay per stage")
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
