"""Convergence at CPU scale: dense vs subspace compression vs lossy baselines at the same bytes.

    .venv/bin/python experiments/convergence.py [--experiment minimal|node0_tiny] [--ablate] [--out DIR] [--steps N]
                                                [extra Hydra overrides...]

Trains the tiny model (d=128, 4 stages, one peer per stage, no churn) on the embedded corpus under
today's rules (``--experiment minimal``) or Node0's (``--experiment node0_tiny``: its optimizer rules,
token-embedding init, weight projection after the step and separate tail calls), with: dense
boundaries; dense boundaries plus the frozen N(0, 1) token table of the subspace model (subspace at
k = d, where the constraint is vacuous: the control that separates the table's effect from the
compression's); subspace compression at rates 32, 16, 8 (k = d/32, d/16, d/8); and, at rate 8, random
projection without the weight constraint and top-k (values + int16 indices).
Writes ``convergence.md`` (table), ``convergence.json`` and ``convergence.png`` (loss vs tokens) into
the output folder (``results/convergence/`` for minimal, ``results/convergence/<experiment>/`` otherwise);
another experiment's run also writes ``comparison.md`` against minimal's saved results. ``--ablate``
instead runs dense and subspace k=d/8 under minimal with one of Node0's rules at a time (its value read
from experiment=node0_tiny) into ``results/convergence/node0_tiny/ablation/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, run_cell, save_json

from node0sim.app import compose_run_config
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
TODAY = "minimal"
NODE0 = "node0_tiny"
# Node0's rules that can move a one-peer-per-stage run's loss, each the keys it sets (values: experiment=node0_tiny's).
# Not here: separate tail calls (the same loss and gradients as the fused call, tests/test_pipeline.py), central stage
# assignment and averaging=node0 (one peer per stage: nothing to assign or average).
NODE0_RULES = {
    "beta2 0.999": ("optim.beta2",),
    "lr floor 0.1": ("optim.min_lr_ratio",),
    "clip 0.18 / tail 0.88": ("optim.clip_grad_norm", "optim.tail_clip_grad_norm"),
    "embedding N(0, 1)": ("model.embedding_init_std",),
    "project weights after step": ("compression.project_gradients",),
}
ABLATED_CELLS = ("dense", "subspace k=d/8")


def rule_overrides(keys: tuple[str, ...]) -> list[str]:
    """``key=value`` overrides setting ``keys`` to experiment=node0_tiny's values."""
    node0 = compose_run_config(f"experiment={NODE0}")
    overrides = []
    for key in keys:
        section, name = key.split(".")
        holder = getattr(node0, section)
        value = holder[name] if isinstance(holder, dict) else getattr(holder, name)
        overrides.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return overrides


def run_cells(out: Path, cells: list[tuple[str, tuple[str, ...]]], *overrides: str) -> dict:
    """Train every ``(label, codec overrides)`` cell with ``overrides``; label -> summary and loss curve."""
    runs = {}
    for label, codec in cells:
        slug = "".join(c if c.isalnum() else "_" for c in label)
        summary, records = run_cell(out / "cells" / slug, *overrides, *codec)
        runs[label] = {"summary": summary, "curve": [(r["tokens"], r["loss"]) for r in records if "step" in r]}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=TODAY, choices=(TODAY, NODE0), help="whose rules the runs follow")
    parser.add_argument("--ablate", action="store_true", help="one Node0 rule at a time on minimal (see above)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: see above)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--report-only", action="store_true", help="rebuild the table and plot from convergence.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every run")
    args = parser.parse_args()
    if args.ablate:
        ablate(args.out or RESULTS / "convergence" / NODE0 / "ablation", args.steps, args.overrides)
        return
    args.out = args.out or RESULTS / "convergence" / ("" if args.experiment == TODAY else args.experiment)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.report_only:
        saved = json.loads((args.out / "convergence.json").read_text())
        runs = {label: {"summary": run, "curve": run["curve"]} for label, run in saved.items()}
    else:
        runs = run_cells(args.out, CELLS, f"experiment={args.experiment}", f"train.steps={args.steps}", *args.overrides)

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
    rules = "today's rules (experiment=minimal)" if args.experiment == TODAY else f"Node0's rules (experiment={args.experiment})"
    report = f"# Convergence: tiny model, {rules}, {args.steps} steps, {tokens:,} tokens, same data and seed\n\n" + table
    (args.out / "convergence.md").write_text(report)
    if not args.report_only:
        save_json(args.out / "convergence.json", {k: v["summary"] | {"curve": v["curve"]} for k, v in runs.items()})
    plot(args.out / "convergence.png", runs, rules)
    print(report)
    if args.experiment != TODAY:
        compare(args.out / "comparison.md", runs)


def val_losses(path: Path) -> dict[str, float]:
    """Label -> validation loss of a saved ``convergence.json``."""
    return {label: run["val_loss"] for label, run in json.loads(path.read_text()).items()}


def compare(path: Path, runs: dict) -> None:
    """Validation loss of each codec under today's rules (minimal's saved results) and under these runs'."""
    today = val_losses(RESULTS / "convergence" / "convergence.json")
    rows = [
        [label, f"{today[label]:.3f}", f"{run['summary']['val_loss']:.3f}", f"{run['summary']['val_loss'] / today[label] - 1:+.1%}"]
        for label, run in runs.items()
    ]
    table = markdown_table(["boundary codec", "val loss, today's rules", "val loss, Node0's rules", "change"], rows)
    path.write_text("# Convergence under today's rules and Node0's (tiny model, same data and seed)\n\n" + table)
    print(table)


def ablate(out: Path, steps: int, extra: list[str]) -> None:
    """Dense and subspace k=d/8 under minimal with one Node0 rule at a time; val loss change against minimal's."""
    out.mkdir(parents=True, exist_ok=True)
    cells = [cell for cell in CELLS if cell[0] in ABLATED_CELLS]
    today = val_losses(RESULTS / "convergence" / "convergence.json")

    def row(rules: str, losses: dict[str, float]) -> list[str]:
        return [rules] + [f"{losses[label]:.3f} ({losses[label] / today[label] - 1:+.1%})" for label in ABLATED_CELLS]

    results, rows = {}, [row(f"today's rules (experiment={TODAY})", today)]
    for rule, keys in NODE0_RULES.items():
        overrides = rule_overrides(keys)
        slug = "".join(c if c.isalnum() else "_" for c in rule)
        runs = run_cells(out / slug, cells, f"experiment={TODAY}", f"train.steps={steps}", *overrides, *extra)
        results[rule] = {"overrides": overrides} | {label: run["summary"]["val_loss"] for label, run in runs.items()}
        rows.append(row(f"+ {rule} (`{' '.join(overrides)}`)", results[rule]))
    rows.append(row(f"all of Node0's (experiment={NODE0})", val_losses(RESULTS / "convergence" / NODE0 / "convergence.json")))
    table = markdown_table(["rules", *(f"val loss, {label}" for label in ABLATED_CELLS)], rows)
    (out / "ablation.md").write_text(f"# One Node0 rule at a time on the tiny model ({steps} steps, same data and seed)\n\n" + table)
    save_json(out / "ablation.json", results)
    print(table)


def plot(path: Path, runs: dict, rules: str) -> None:
    """Training loss against tokens, one line per codec."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, run in runs.items():
        tokens, losses = zip(*run["curve"])
        ax.plot(tokens, losses, label=label, linewidth=1.2)
    ax.set(xlabel="tokens", ylabel="training loss", title=f"tiny Llama, 4 stages: boundary codecs, {rules}", ylim=(2.0, 4.0))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
