"""Reproductions of published numbers: each one runs its preset and writes published, simulated, error and what dominates.

    .venv/bin/python experiments/reproduce.py [name ...] [--out DIR]     # no name: all of them

Names (presets in ``conf/experiment/``): ``nanogpt_dense`` and ``nanogpt_ssn`` (ProtocolNanoGPT's two records, s/step),
``8b_slowdown`` (the Protocol Models 8B run's uncompressed slowdown; a secondary source), ``node0`` (Node0's own
setting, ``experiment=node0``: compressed 80 Mb/s against dense 100 Gb/s). Each writes ``<name>.md`` and ``<name>.json``
into ``experiments/results/reproduce/`` (``--out``): a table of published, simulated, error % and the dominant model
term, with the model's terms per cell computed from the config (:func:`model_terms`: compute of the slowest stage,
bytes of the busiest link over its bandwidth, latency x hops), so the table says which one sets the number.

Pipelines: the ProtocolNanoGPT and 8B presets set the stage-to-stage pipeline themselves (``topology.pipeline=direct``,
1F1B and ``topology.schedule=gpipe``), as their sources ran; ``node0`` runs Node0's relayed pipeline.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import RESULTS, run_cell, save_json

from node0sim.app import compose_run_config
from node0sim.config import RunConfig
from node0sim.experiment import model_config
from node0sim.model.costs import stage_forward_cost, stage_shapes, stage_training_cost
from node0sim.protocol.codecs import make_codec
from node0sim.reporting import markdown_table
from node0sim.sim.gpus import compute_model, gpu_profile
from node0sim.sim.regions import region_preset

OUT = RESULTS / "reproduce"
TOKEN_BYTES = 8
"""Token ids and targets as the trainer sends them (int64, ``node0sim/experiment.py``)."""
SIDE_CHANNEL_BYTES = 4
"""Token ids sent with compressed activations (int32, ``Trainer._side_channel``)."""
ERROR_TARGET_PCT = 10.0
"""The issue's target: each reproduction within 10% of the published number."""


@dataclass(frozen=True)
class Quantity:
    """One published number and how to get it from the cells' results: ``kind`` ``step_time`` (s/step of cell
    ``numerator``), ``slowdown`` (step time of ``numerator`` / that of ``denominator``) or ``throughput_ratio``
    (steady tokens/s of ``numerator`` / that of ``denominator``)."""

    label: str
    published: float
    unit: str
    kind: str
    numerator: str
    denominator: str | None = None


@dataclass(frozen=True)
class Reproduction:
    """A published result, its source, the runs (cells: label -> Hydra overrides) that reproduce it, and effects the
    simulator leaves out (``missing``: a label and the seconds per step it would add, from :func:`missing_effects`)."""

    name: str
    source: str
    cells: dict[str, tuple[str, ...]]
    quantities: tuple[Quantity, ...]
    secondary: bool = False
    meter_serializes_latency: bool = False
    """The source's link meter holds a link for each message's latency too (ProtocolNanoGPT's ``add_delay``:
    ``arrives_at = max(arrives_at, sent_at) + bits / bandwidth + latency``), which the fluid model does not."""


NANOGPT_SOURCE = (
    "PluralisResearch/ProtocolNanoGPT @0551bc3, records/*/README.md and train_gpt.py (first-party; "
    "../shared/reference/protocol-models-and-async-nesterov.md section 1.5)"
)

REPRODUCTIONS = {
    r.name: r
    for r in (
        Reproduction(
            "nanogpt_dense", NANOGPT_SOURCE, {"dense": ("experiment=reproduce_nanogpt_dense",)},
            (Quantity("dense bf16, s/step", 100.475, "s", "step_time", "dense"),),
            meter_serializes_latency=True,
        ),
        Reproduction(
            "nanogpt_ssn", NANOGPT_SOURCE, {"ssn": ("experiment=reproduce_nanogpt_ssn",)},
            (Quantity("ReparamSSN k=160, s/step", 19.889, "s", "step_time", "ssn"),),
            meter_serializes_latency=True,
        ),
        Reproduction(
            "8b_slowdown",
            "Ramasinghe et al., arXiv 2506.01260, 8B run, via a third-party note (SECONDARY, not checked against the "
            "paper; ../shared/reference/protocol-models-and-async-nesterov.md section 1.3 [S])",
            {
                "datacenter": ("experiment=reproduce_8b_slowdown", "network.up_mbps=100000", "network.down_mbps=100000",
                               "network.regions=datacenter"),
                "wan_60": ("experiment=reproduce_8b_slowdown",),
                "wan_350": ("experiment=reproduce_8b_slowdown", "network.up_mbps=350", "network.down_mbps=350"),
            },
            (
                Quantity("dense slowdown, 60 Mb/s vs datacenter", 13.0, "x", "slowdown", "wan_60", "datacenter"),
                Quantity("dense slowdown, 350 Mb/s vs datacenter", 13.0, "x", "slowdown", "wan_350", "datacenter"),
            ),
            secondary=True,
        ),
        Reproduction(
            "node0",
            "Node0 / Protocol Models abstract (first-party): 80 Mb/s compressed 'matching' 100 Gb/s datacenter training; "
            "read as throughput parity (1.0; the mission's bar: >= 0.9)",
            {
                "datacenter_dense": ("experiment=node0", "network=datacenter", "compression=none"),
                "internet_subspace": ("experiment=node0", "network=internet", "compression=subspace"),
            },
            (Quantity("tokens/s, 80 Mb/s subspace vs 100 Gb/s dense", 1.0, "x", "throughput_ratio", "internet_subspace",
                      "datacenter_dense"),),
        ),
    )
}


# ---- the model's terms, from the config ---------------------------------------------------------------------------
def boundary_bytes(run: RunConfig) -> tuple[float, float]:
    """``(activation, token_ids)`` bytes of one micro-batch at a stage boundary: the codec's activation payload in
    the wire dtype (timing mode: ``sim.timing_dtype``) and the int32 ids that travel with it when the codec needs them.
    A gradient is one activation's size (no ids)."""
    import torch

    cfg = model_config(run, None)
    dtype = getattr(torch, run.sim.timing_dtype) if not run.sim.numerics else torch.float32
    codec = make_codec(run.compression.name, cfg.dim, run.compression.rate, run.compression.bits,
                       activation_bytes=dtype.itemsize)
    b, t = run.train.micro_batch_size, run.train.seq_len
    activation = float(codec.activation_spec(b, t, cfg.dim, dtype).nbytes)
    ids = float(b * t * SIDE_CHANNEL_BYTES) if getattr(codec, "needs_token_ids", False) else 0.0
    return activation, ids


def trainer_link_bytes(run: RunConfig) -> tuple[float, float]:
    """``(up, down)`` bytes one micro-batch puts on its trainer's links in the relayed pipeline (the trainer calls each
    stage in turn and relays every tensor; fused or separate tail calls). Uplink: token inputs to the head's forward
    and backward, activations (+ ids) to stages 1..S-1, a backward request to stages 1..S-2 carrying its input and the
    output gradient (+ ids), the head's backward the output gradient, the tail its targets. Downlink: every stage's
    output and every input gradient but the head's. 64-byte headers are left out."""
    a, ids = boundary_bytes(run)
    s, tokens = run.topology.num_stages, run.train.micro_batch_size * run.train.seq_len
    body = max(s - 2, 0)
    up = TOKEN_BYTES * tokens * 2 + a  # head: forward tokens; backward tokens + output gradient
    up += body * (a + ids) + body * (2 * a + ids)  # body stages: forward input; backward input + output gradient
    down = (s - 1) * a + a + body * a  # outputs of stages 0..S-2, the tail's input gradient, the body's input gradients
    tail = a + ids + TOKEN_BYTES * tokens  # the tail's input and targets
    if run.topology.tail_calls == "separate":  # forward (-> per-token fp32 loss), then backward with its gradient
        up += tail + tail + 4 * tokens
        down += 4 * tokens
    else:
        up += tail
    return up, down


def stage_link_bytes(run: RunConfig) -> tuple[float, float]:
    """``(up, down)`` bytes one micro-batch puts on a body stage's links. Relayed: it receives the forward input (+ ids)
    and the backward request (the input again, the output gradient, ids) and sends its output and the input gradient.
    Direct (``topology.pipeline=direct``): it receives the activations (+ ids), with the targets that travel to the
    tail (int64, ``PipeForwardRequest.targets``), and the output gradient, and sends the same."""
    a, ids = boundary_bytes(run)
    if run.topology.pipeline == "direct":
        forward = a + ids + TOKEN_BYTES * run.train.micro_batch_size * run.train.seq_len
        return forward + a, forward + a
    return 2 * a, 3 * a + 2 * ids


def busiest_link(run: RunConfig) -> tuple[str, float]:
    """``(which link, seconds)``: the link whose bytes per step over its bandwidth take longest (the busier
    direction): a body stage's (all M micro-batches of a step) or, relayed, a trainer's (its M / num_trainers)."""
    up_bps, down_bps = run.network.up_mbps * 1e6 / 8, run.network.down_mbps * 1e6 / 8
    m = run.train.micro_batches_per_step
    up, down = stage_link_bytes(run)
    links = {"a body stage's links": m * max(up / up_bps, down / down_bps)}
    if run.topology.pipeline == "relayed":
        up, down = trainer_link_bytes(run)
        links["a trainer's links"] = m / run.topology.num_trainers * max(up / up_bps, down / down_bps)
    name = max(links, key=links.get)
    return name, links[name]


def critical_hops(run: RunConfig) -> int:
    """One-way network trips in one micro-batch's chain: relayed, a request and a reply per call (S - 1 forwards, the
    tail's one or two calls, S - 1 backwards); direct, one per boundary each way plus the trainer's hand-off and return."""
    s = run.topology.num_stages
    if run.topology.pipeline == "direct":
        return 2 * (s - 1) + 2
    tail_calls = 2 if run.topology.tail_calls == "separate" else 1
    return 2 * (2 * (s - 1) + tail_calls)


def one_way_latency_s(run: RunConfig) -> float:
    """``network.latency_ms``, or the region preset's largest one-way latency (an upper bound for a chain)."""
    if run.network.latency_ms is not None:
        return run.network.latency_ms / 1000
    preset = region_preset(run.network.regions)
    return max(preset.latency_ms(a, b) for a in preset.regions for b in preset.regions) / 1000


def stage_compute_s(run: RunConfig) -> list[float]:
    """Accelerator seconds per micro-batch of each stage: a forward call and a backward call (which recomputes the
    forward), or the fused tail's one call, each with ``sim.call_overhead_ms``, on ``sim.gpu`` under ``sim.compute_model``."""
    cfg = model_config(run, None)
    model = compute_model(run.sim.compute_model, gpu_profile(run.sim.gpu), run.sim.compute_dtype, run.sim.utilization)
    overhead, b, t = run.sim.call_overhead_ms / 1000, run.train.micro_batch_size, run.train.seq_len
    seconds = []
    for layers, is_head, is_tail in stage_shapes(cfg, run.topology.num_stages):
        backward = model.seconds(stage_training_cost(cfg, layers, is_head, is_tail, b, t)) + overhead
        forward = model.seconds(stage_forward_cost(cfg, layers, is_head, is_tail, b, t)) + overhead
        fused = is_tail and run.topology.tail_calls == "fused"
        seconds.append(backward if fused else forward + backward)
    return seconds


def model_terms(run: RunConfig) -> dict[str, float]:
    """Seconds per step of each term of the model, from the config alone (M micro-batches per step):
    ``compute``: M x the slowest stage's compute per micro-batch; ``transfer``: the busiest link's bytes per step over
    its bandwidth (:func:`busiest_link`); ``latency``: the critical chain's one-way hops x latency (paid once per step by a
    flushing schedule whose micro-batches overlap, M times by one that does not)."""
    return {
        "compute": run.train.micro_batches_per_step * max(stage_compute_s(run)),
        "transfer": busiest_link(run)[1],
        "latency": critical_hops(run) * one_way_latency_s(run),
    }


def missing_effects(reproduction: Reproduction, run: RunConfig) -> dict[str, float]:
    """Seconds per step the source's timing has and the simulator's model does not: ProtocolNanoGPT's meter holds a
    stage's inbound wire for the latency of every message, 2 M messages (M forwards in, M gradients in) per step
    (modelled with ``sim.pair_streams=serial``, which holds each direction of a pair for a message's bytes and latency)."""
    if not reproduction.meter_serializes_latency or run.sim.pair_streams == "serial":
        return {}
    return {"serialized latency (source's meter)": 2 * run.train.micro_batches_per_step * one_way_latency_s(run)}


def chain_s(run: RunConfig) -> float:
    """Seconds one micro-batch takes through an idle direct pipeline, its forward call back at the trainer: the hand-off
    to stage 0 (token ids and targets), S - 1 forward hops (activations, ids, targets) and S - 1 gradient hops, each its
    latency plus bytes / bandwidth, every stage's compute, and the responses that return along the path (S to the
    trainer's forward call, S - 1 to the backward calls; a latency each, their few bytes left out)."""
    a, ids = boundary_bytes(run)
    tokens, s = run.train.micro_batch_size * run.train.seq_len, run.topology.num_stages
    bandwidth, latency = min(run.network.up_mbps, run.network.down_mbps) * 1e6 / 8, one_way_latency_s(run)
    hops = latency + 2 * TOKEN_BYTES * tokens / bandwidth
    hops += (s - 1) * (latency + (a + ids + TOKEN_BYTES * tokens) / bandwidth) + (s - 1) * (latency + a / bandwidth)
    return hops + sum(stage_compute_s(run)) + (2 * s - 1) * latency


def window_bound_s(run: RunConfig) -> float | None:
    """Least seconds per step of the direct 1F1B pipeline from its window alone: the trainer keeps at most
    ``num_stages`` micro-batches in flight and frees a place only when a forward call is back, so a step of M takes at
    least M / min(S, M) x :func:`chain_s`, however fast the links are shared. None for other pipelines."""
    if run.topology.pipeline != "direct" or run.topology.schedule != "1f1b":
        return None
    m = run.train.micro_batches_per_step
    return m / min(run.topology.num_stages, m) * chain_s(run)


def source_meter_busy_s(run: RunConfig) -> float:
    """Seconds per step ProtocolNanoGPT's meter keeps a body stage's inbound wire busy: every forward input and every
    output gradient holds it for its bytes over the bandwidth plus the latency (direct pipeline; this codec's bytes)."""
    m, (a, ids) = run.train.micro_batches_per_step, boundary_bytes(run)
    bandwidth, latency = run.network.down_mbps * 1e6, one_way_latency_s(run)
    return m * (8 * (a + ids) / bandwidth + latency) + m * (8 * a / bandwidth + latency)


def dominant_term(terms: dict[str, float]) -> str:
    """The largest term, with its share of all terms: ``"transfer (92%)"``."""
    total = sum(terms.values())
    name = max(terms, key=terms.get)
    return f"{name} ({terms[name] / total:.0%})" if total > 0 else name


# ---- the measurement and the table --------------------------------------------------------------------------------
def steady_step_time(records: list[dict[str, Any]]) -> float:
    """Median virtual seconds between consecutive steps after the first (which includes discovery and the fill)."""
    times = [r["time_s"] for r in records if "step" in r]
    gaps = [b - a for a, b in zip(times, times[1:])]
    if not gaps:
        raise ValueError("a step time needs at least 2 logged steps")
    return statistics.median(gaps)


def simulated_value(quantity: Quantity, cells: dict[str, dict[str, Any]]) -> float:
    """The simulated counterpart of ``quantity`` from the cells' results (``step_time_s``, ``tokens_per_s_steady``)."""
    if quantity.kind == "step_time":
        return cells[quantity.numerator]["step_time_s"]
    if quantity.kind == "slowdown":
        return cells[quantity.numerator]["step_time_s"] / cells[quantity.denominator]["step_time_s"]
    if quantity.kind == "throughput_ratio":
        rates = {name: cells[name]["tokens_per_s_steady"] for name in (quantity.numerator, quantity.denominator)}
        missing = [name for name, rate in rates.items() if rate is None]
        if missing:
            raise ValueError(f"cell {missing[0]} has no steady-state rate (fewer than two steps between the pipeline's "
                             "fill and its drain): run more train.steps")
        return rates[quantity.numerator] / rates[quantity.denominator]
    raise ValueError(f"unknown quantity kind {quantity.kind!r}; known: step_time, slowdown, throughput_ratio")


def error_pct(simulated: float, published: float) -> float:
    """Signed relative error of the simulation against the published number, in percent."""
    return 100.0 * (simulated - published) / published


def table_rows(reproduction: Reproduction, cells: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per published quantity: published, simulated, error %, within the target, and the dominant term of the
    cell that sets it (the numerator's)."""
    rows = []
    for q in reproduction.quantities:
        simulated = simulated_value(q, cells)
        error = error_pct(simulated, q.published)
        rows.append({
            "quantity": q.label, "published": q.published, "simulated": simulated, "unit": q.unit, "error_pct": error,
            "within_target": abs(error) <= ERROR_TARGET_PCT, "dominant": dominant_term(cells[q.numerator]["terms"]),
        })
    return rows


def render(reproduction: Reproduction, rows: list[dict[str, Any]], cells: dict[str, dict[str, Any]]) -> str:
    """The markdown report: the table, then each cell's overrides, pipeline mode, terms and measurement."""
    lines = [f"# Reproduction: {reproduction.name}", "", f"Source: {reproduction.source}."]
    if reproduction.secondary:
        lines.append("**Secondary source**: the published number is a third party's report, not checked against the paper.")
    lines.append("")
    lines.append(markdown_table(
        ["quantity", "published", "simulated", "error", "within 10%", "dominant term (model)"],
        [[r["quantity"], f"{r['published']:g} {r['unit']}", f"{r['simulated']:.3f} {r['unit']}", f"{r['error_pct']:+.1f}%",
          "yes" if r["within_target"] else "no", r["dominant"]] for r in rows],
    ))
    lines.append("")
    term_rows = []
    for name, c in cells.items():
        missing = "; ".join(f"{k}: {v:.2f}" for k, v in c["missing"].items()) or "-"
        terms = [f"{c['terms'][k]:.3f}" for k in ("compute", "transfer", "latency")]
        term_rows.append([name, c["pipeline"], f"{c['step_time_s']:.3f}", *terms, dominant_term(c["terms"]), missing])
    lines.append(markdown_table(
        ["cell", "pipeline", "measured s/step", "compute s", "transfer s", "latency s", "dominant", "not modelled s"],
        term_rows,
    ))
    lines.append("")
    lines.append("Terms per step, from the config (`experiments/reproduce.py model_terms`): compute = micro-batches x the "
                 "slowest stage's accelerator time; transfer = the busiest link's bytes per step / bandwidth (the busier "
                 "direction of a body stage's links or, relayed, a trainer's, which carry M / trainers micro-batches; "
                 "the busiest is named per cell in the JSON); latency = one-way hops of one "
                 "micro-batch's chain x latency. Not modelled: time the source's own timing charges that the simulator's "
                 "model has no term for.")
    for name, c in cells.items():
        if c["window_bound_s"] is not None:
            lines.append(f"- `{name}`: the 1F1B window (at most S micro-batches in flight, a place freed when a forward "
                         f"call is back) bounds a step at M / S x one micro-batch's idle chain = {c['window_bound_s']:.3f} s "
                         f"(`window_bound_s`).")
        if c["source_meter_busy_s"] is not None:
            lines.append(f"- `{name}`: the source's meter keeps a body stage's inbound wire busy 2 M x (bytes x 8 / bandwidth "
                         f"+ latency) = {c['source_meter_busy_s']:.3f} s per step (`source_meter_busy_s`).")
    for name, c in cells.items():
        lines.append(f"- `{name}`: `{' '.join(c['overrides'])}`; {c['steps']} steps, {c['sim_time_s']:.1f} s virtual, "
                     f"{_number(c['tokens_per_s_steady'])} tok/s steady, {c['activation_bytes_per_token']:,.0f} activation "
                     f"B/token, {c['wall_time_s']:.1f} s wall")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def run_reproduction(reproduction: Reproduction, out: Path) -> dict[str, Any]:
    """Run every cell of ``reproduction``, write ``<name>.md`` and ``<name>.json`` into ``out``, return the result."""
    cells = {}
    for name, overrides in reproduction.cells.items():
        run = compose_run_config(*overrides)
        summary, records = run_cell(out / "cells" / reproduction.name / name, *overrides)
        link, _ = busiest_link(run)
        schedule = run.topology.schedule if run.topology.pipeline == "direct" else run.train.schedule
        cells[name] = {
            "overrides": list(overrides), "pipeline": f"{run.topology.pipeline}, {schedule}",
            "step_time_s": steady_step_time(records), "terms": model_terms(run), "busiest_link": link,
            "missing": missing_effects(reproduction, run),
            "source_meter_busy_s": source_meter_busy_s(run) if reproduction.meter_serializes_latency else None,
            "window_bound_s": window_bound_s(run),
            **{k: summary[k] for k in ("steps", "sim_time_s", "wall_time_s", "tokens_per_s_steady", "activation_bytes_per_token")},
        }
    rows = table_rows(reproduction, cells)
    report = render(reproduction, rows, cells)
    (out / f"{reproduction.name}.md").write_text(report)
    result = {"name": reproduction.name, "source": reproduction.source, "secondary": reproduction.secondary,
              "rows": rows, "cells": cells}
    save_json(out / f"{reproduction.name}.json", result)
    print(report, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[[], *REPRODUCTIONS], help="reproductions to run (default: all)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(REPRODUCTIONS):
        run_reproduction(REPRODUCTIONS[name], args.out)


if __name__ == "__main__":
    main()
