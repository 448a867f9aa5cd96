"""Node0's headline in simulation: 80 Mb/s vs 100 Gb/s, with and without subspace compression.

    .venv/bin/python experiments/headline.py [--experiment headline|node0] [--out DIR] [extra Hydra overrides...]
    .venv/bin/python experiments/headline.py --surface [--jobs 2] [--gpus l4 h100 ...] [--report-only]

Runs ``experiment=headline`` (node0_8b, 32 stages, timing mode; or ``--experiment node0``: the same with Node0's
mechanisms, conf/experiment/node0.yaml) for network in {datacenter, internet} x compression in {none, subspace
(rate 100)}, then writes ``headline.md`` (table and verdicts on the two claims), ``headline.json`` and
``headline.png`` into the output folder (default ``experiments/results/<experiment>``).
Throughput is the steady-state rate over the second half of the run (pipeline fill excluded).

``--surface`` runs the claim over a grid instead (experiments/surface.py): in-flight micro-batches x RTT x GPU x
wire dtype x seeds, compressed 80 Mb/s with latency jitter against dense 100 Gb/s, and writes ``surface.md``,
``surface.json`` and ``surface.png``; ``--report-only`` rebuilds them from ``surface.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import surface
from common import RESULTS, run_cell, save_json

from node0sim.reporting import markdown_table, pyplot, save_figure

CELLS = [(net, comp) for comp in ("none", "subspace") for net in ("datacenter", "internet")]
LINK = {"datacenter": "100 Gb/s", "internet": "80 Mb/s"}
DENSE_SLOWDOWN = 10.0
"""How much slower the dense pipeline must be at 80 Mb/s than at 100 Gb/s for compression to matter. Not a published
figure: the nearest is the Protocol Models 8B run's uncompressed decentralized baseline, reported 13x slower (a
secondary source, not checked against arXiv 2506.01260; 64 L4s on 60-350 Mb/s links: ../shared/reference/
protocol-models-and-async-nesterov.md, section 1.3)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=["headline", "node0"], default="headline", help="the preset of every cell")
    parser.add_argument("--out", type=Path, help="output folder (default experiments/results/<experiment>)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every cell")
    surface.add_arguments(parser)
    args = parser.parse_args()
    args.out = args.out or RESULTS / args.experiment
    args.out.mkdir(parents=True, exist_ok=True)
    if args.surface or args.report_only:
        surface.main(args)
        return

    results = {}
    for net, comp in CELLS:
        summary, _ = run_cell(args.out / "cells" / f"{net}_{comp}", f"experiment={args.experiment}", f"network={net}",
                              f"compression={comp}", *args.overrides)
        results[f"{net}/{comp}"] = summary

    def rate(net: str, comp: str) -> float:
        steady = results[f"{net}/{comp}"]["tokens_per_s_steady"]
        if steady is None:
            raise SystemExit(f"headline: cell {net}/{comp} has no steady-state rate (fewer than two steps between the "
                             "pipeline's fill and its drain): run more train.steps")
        return steady

    baseline = rate("datacenter", "none")
    rows = []
    for net, comp in CELLS:
        s = results[f"{net}/{comp}"]
        rows.append([
            LINK[net], comp, f"{rate(net, comp):,.0f}", f"{rate(net, comp) / baseline:.3f}",
            f"{s['activation_bytes_per_token']:,.0f}", f"{s['sim_time_s']:,.1f}", f"{s['wall_time_s']:.1f}",
        ])
    keeps = rate("internet", "subspace") / baseline
    slowdown = baseline / rate("internet", "none")
    verdicts = [
        f"- Compressed pipeline at 80 Mb/s keeps **{keeps:.1%}** of the dense 100 Gb/s throughput "
        f"(threshold >= {surface.CLAIM_SHARE:.0%}, not a published figure: experiments/surface.py CLAIM_SHARE): "
        f"{'reproduced' if keeps >= surface.CLAIM_SHARE else 'NOT reproduced'}.",
        f"- Dense pipeline at 80 Mb/s is **{slowdown:.1f}x** slower than at 100 Gb/s "
        f"(threshold >= {DENSE_SLOWDOWN:g}x, not a published figure: experiments/headline.py DENSE_SLOWDOWN): "
        f"{'reproduced' if slowdown >= DENSE_SLOWDOWN else 'NOT reproduced'}.",
    ]
    table = markdown_table(
        ["links", "compression", "tokens/s (steady)", "vs dense 100 Gb/s", "activation B/token", "virtual s", "wall s"],
        rows,
    )
    setup = " ".join([f"experiment={args.experiment}", *args.overrides])
    report = f"# Headline: node0_8b, 32 stages, timing mode (`{setup}`)\n\n" + table + "\n" + "\n".join(verdicts) + "\n"
    (args.out / "headline.md").write_text(report)
    save_json(args.out / "headline.json", {"cells": results, "keeps": keeps, "dense_slowdown": slowdown})
    plot(args.out / "headline.png", rows)
    print(report)


def plot(path: Path, rows: list[list[str]]) -> None:
    """Bar chart of steady throughput per cell."""
    plt = pyplot()
    labels = [f"{r[0]}\n{r[1]}" for r in rows]
    values = [float(r[2].replace(",", "")) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, values, color=["#888", "#c44", "#48c", "#4a4"])
    ax.set(ylabel="tokens/s (steady state)", title="node0_8b, 32 stages: links x compression", yscale="log")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
