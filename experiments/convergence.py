"""Convergence at CPU scale: dense vs subspace compression vs lossy baselines at the same bytes.

    .venv/bin/python experiments/convergence.py [--out DIR] [--steps N] [extra Hydra overrides...]

Trains the tiny model (d=128, 4 stages; ``experiment=minimal``: one peer per stage, no churn) on the
embedded corpus with: dense boundaries; dense boundaries plus the frozen N(0, 1) token table of the
subspace model (subspace at k = d, where the constraint is vacuous: the control that separates the
table's effect from the compression's); subspace compression at rates 32, 16, 8 (k = d/32, d/16, d/8);
and, at rate 8, random projection without the weight constraint and top-k (values + int16 indices).
Writes ``convergence.md`` (table), ``convergence.json`` and ``convergence.png`` (loss vs tokens) into
the output folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, run_cell, save_json

from node0sim.reporting import markdown_table, pyplot, save_figure

CONTROL = "dense + fixed table (subspace k=d)"
CELLS = [
    ("dense", ("compression=none",)),
    (CONTROL, ("compression=subspace", "compression.rate=1")),
    ("subspace k=d/32", ("compression=subspace", "compression.rate=32")),
    ("subspace k=d/16", ("compression=subspace", "compression.rate=16")),
    ("subspace k=d/8", ("compression=subspace", "compression.rate=8")),
    ("random projection k=d/8", ("compression=random_projection", "compression.rate=8")),
    ("top-k at 1/8 bytes", ("compression=topk", "compression.rate=8")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "convergence")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--report-only", action="store_true", help="rebuild the table and plot from convergence.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.report_only:
        saved = json.loads((args.out / "convergence.json").read_text())
        runs = {label: {"summary": run, "curve": run["curve"]} for label, run in saved.items()}
    else:
        runs = {}
        for label, overrides in CELLS:
            slug = "".join(c if c.isalnum() else "_" for c in label)
            cell = args.out / "cells" / slug
            summary, records = run_cell(cell, "experiment=minimal", f"train.steps={args.steps}", *overrides, *args.overrides)
            runs[label] = {"summary": summary, "curve": [(r["tokens"], r["loss"]) for r in records if "step" in r]}

    def tail_loss(label: str) -> float:
        losses = [loss for _, loss in runs[label]["curve"][-10:]]
        return sum(losses) / len(losses)

    dense_val = runs["dense"]["summary"]["val_loss"]
    control_val = runs[CONTROL]["summary"]["val_loss"]
    dense_bytes = runs["dense"]["summary"]["activation_bytes_per_token"]
    rows = []
    for label, _ in CELLS:
        s = runs[label]["summary"]
        rows.append([
            label, f"{s['activation_bytes_per_token']:,.0f}", f"{dense_bytes / s['activation_bytes_per_token']:.1f}x",
            f"{tail_loss(label):.3f}", f"{s['val_loss']:.3f}", f"{(s['val_loss'] - dense_val) / dense_val:+.1%}",
            f"{(s['val_loss'] - control_val) / control_val:+.1%}",
        ])
    table = markdown_table(
        ["boundary codec", "activation B/token", "fewer bytes", "train loss (last 10 steps)", "val loss",
         "val gap vs dense", "val gap vs dense + fixed table"],
        rows,
    )
    tokens = runs["dense"]["summary"]["tokens"]
    report = f"# Convergence: tiny model, {args.steps} steps, {tokens:,} tokens, same data and seed\n\n" + table
    (args.out / "convergence.md").write_text(report)
    if not args.report_only:
        save_json(args.out / "convergence.json", {k: v["summary"] | {"curve": v["curve"]} for k, v in runs.items()})
    plot(args.out / "convergence.png", runs)
    print(report)


def plot(path: Path, runs: dict) -> None:
    """Training loss against tokens, one line per codec."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, run in runs.items():
        tokens, losses = zip(*run["curve"])
        ax.plot(tokens, losses, label=label, linewidth=1.2)
    ax.set(xlabel="tokens", ylabel="training loss", title="tiny Llama, 4 stages: boundary codecs", ylim=(2.0, 4.0))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
