"""experiments/reproduce.py: its presets compose, its model terms follow their formulas and the simulator's bytes, and
its table arithmetic (error %, dominant term, ratios) on fake results; one short run writes the report."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from node0sim.app import compose_run_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import reproduce  # noqa: E402

MB = 8 * 1024  # tokens of one ProtocolNanoGPT micro-batch (mbs 8 x 1024)


@pytest.mark.parametrize("name", sorted(reproduce.REPRODUCTIONS))
def test_every_cell_of_every_reproduction_composes_and_validates(name):
    reproduction = reproduce.REPRODUCTIONS[name]
    for cell in reproduction.cells:
        run = compose_run_config(*reproduction.cells[cell])
        assert run.sim.numerics is False  # every reproduction is a timing run


def test_each_preset_runs_its_sources_pipeline():
    """ProtocolNanoGPT: stage to stage, 1F1B; the 8B run: stage to stage, GPipe; Node0: its relayed pipeline."""
    pipelines = {name: {(run.topology.pipeline, run.topology.schedule) for run in
                        (compose_run_config(*overrides) for overrides in r.cells.values())}
                 for name, r in reproduce.REPRODUCTIONS.items()}
    assert pipelines == {"nanogpt_dense": {("direct", "1f1b")}, "nanogpt_ssn": {("direct", "1f1b")},
                         "8b_slowdown": {("direct", "gpipe")}, "node0": {("relayed", "1f1b")}}


def test_the_nanogpt_presets_hold_the_records_setting():
    dense = compose_run_config("experiment=reproduce_nanogpt_dense")
    ssn = compose_run_config("experiment=reproduce_nanogpt_ssn")
    train = dense.train
    assert (dense.topology.num_stages, train.micro_batches_per_step, train.micro_batch_size * train.seq_len) == (8, 64, MB)
    assert (dense.network.up_mbps, dense.network.down_mbps, dense.network.latency_ms, dense.sim.gpu) == (200, 200, 50, "h100")
    assert reproduce.boundary_bytes(dense) == (MB * 1024 * 2, 0.0)  # bf16, d = 1024, no ids
    assert reproduce.boundary_bytes(ssn) == (MB * 160 * 2, MB * 4)  # rank floor(1024 / 6.4) = 160, int32 ids


def test_the_8b_cells_run_at_their_own_bandwidths():
    """The preset's own network values win over a ``network=`` group choice, so each cell sets its links explicitly."""
    reproduction = reproduce.REPRODUCTIONS["8b_slowdown"]
    links = {cell: compose_run_config(*reproduction.cells[cell]).network for cell in reproduction.cells}
    assert {cell: (n.up_mbps, n.down_mbps) for cell, n in links.items()} == {
        "datacenter": (100000, 100000), "wan_60": (60, 60), "wan_350": (350, 350)}
    assert (links["datacenter"].regions, links["wan_60"].regions) == ("datacenter", "worldwide")


def test_the_terms_follow_their_formulas():
    run = compose_run_config("experiment=reproduce_nanogpt_dense")
    a, m, bandwidth, s = MB * 1024 * 2, 64, 200e6, 8
    direct = reproduce.model_terms(run)
    assert direct["transfer"] == pytest.approx(m * 8 * (2 * a + 8 * MB) / bandwidth)  # a body stage: activations and
    # the int64 targets in, gradients in
    assert direct["latency"] == pytest.approx((2 * (s - 1) + 2) * 0.05)
    relayed = reproduce.model_terms(compose_run_config("experiment=reproduce_nanogpt_dense", "topology.pipeline=relayed"))
    uplink = 2 * 8 * MB + a + (s - 2) * 3 * a + a + 8 * MB  # the trainer's uplink: (3 S - 4) activations plus tokens
    assert relayed["transfer"] == pytest.approx(m * 8 * uplink / bandwidth)
    assert relayed["latency"] == pytest.approx(2 * (2 * (s - 1) + 1) * 0.05)
    assert relayed["compute"] == direct["compute"] == pytest.approx(m * max(reproduce.stage_compute_s(run)))
    assert reproduce.missing_effects(reproduce.REPRODUCTIONS["nanogpt_dense"], run) == {}  # the preset's pair_streams=serial
    shared = compose_run_config("experiment=reproduce_nanogpt_dense", "sim.pair_streams=shared")
    missing = reproduce.missing_effects(reproduce.REPRODUCTIONS["nanogpt_dense"], shared)
    assert missing == {"serialized latency (source's meter)": pytest.approx(2 * m * 0.05)}


def test_the_1f1b_window_bounds_a_step_at_m_over_s_chains():
    ssn = compose_run_config("experiment=reproduce_nanogpt_ssn")
    (a, ids), s, bandwidth, latency = reproduce.boundary_bytes(ssn), 8, 200e6 / 8, 0.05
    chain = (latency + 16 * MB / bandwidth) + (s - 1) * (latency + (a + ids + 8 * MB) / bandwidth) \
        + (s - 1) * (latency + a / bandwidth) + sum(reproduce.stage_compute_s(ssn)) + (2 * s - 1) * latency
    assert reproduce.chain_s(ssn) == pytest.approx(chain)
    assert reproduce.window_bound_s(ssn) == pytest.approx(64 / 8 * chain)
    assert reproduce.window_bound_s(compose_run_config("experiment=reproduce_nanogpt_ssn", "train.batch_size=32")) \
        == pytest.approx(chain)  # 4 micro-batches: all in flight at once
    assert reproduce.window_bound_s(compose_run_config("experiment=reproduce_8b_slowdown")) is None  # GPipe
    assert reproduce.window_bound_s(compose_run_config("experiment=reproduce_nanogpt_ssn", "topology.pipeline=relayed")) is None


def test_the_busiest_link_is_a_stages_once_many_trainers_share_the_relaying():
    one = compose_run_config("experiment=reproduce_nanogpt_dense", "topology.pipeline=relayed")
    many = compose_run_config("experiment=reproduce_nanogpt_dense", "topology.pipeline=relayed", "topology.num_trainers=8",
                              "train.schedule=async")
    a, m, bandwidth = MB * 1024 * 2, 64, 200e6
    assert reproduce.busiest_link(one)[0] == "a trainer's links"  # (3 S - 4) = 20 activations per micro-batch
    name, seconds = reproduce.busiest_link(many)  # a trainer's 8 micro-batches x 20 < a body stage's 64 x 3
    assert (name, seconds) == ("a body stage's links", pytest.approx(m * 8 * 3 * a / bandwidth))


def test_the_source_meter_holds_the_wire_for_each_messages_latency():
    ssn = compose_run_config("experiment=reproduce_nanogpt_ssn")
    forward, backward = MB * (160 * 2 + 4), MB * 160 * 2
    assert reproduce.source_meter_busy_s(ssn) == pytest.approx(64 * (8 * forward / 200e6 + 0.05) + 64 * (8 * backward / 200e6 + 0.05))


def test_dominant_term_names_the_largest_with_its_share():
    assert reproduce.dominant_term({"compute": 1.0, "transfer": 8.0, "latency": 1.0}) == "transfer (80%)"
    assert reproduce.dominant_term({"compute": 0.0, "transfer": 0.0, "latency": 0.0}) == "compute"


def test_table_arithmetic_on_a_fake_result():
    terms = {"compute": 2.0, "transfer": 6.0, "latency": 2.0}
    cells = {"wan": {"step_time_s": 130.0, "tokens_per_s_steady": 50.0, "terms": terms},
             "dc": {"step_time_s": 10.0, "tokens_per_s_steady": 400.0, "terms": terms}}
    fake = reproduce.Reproduction("fake", "a test", {"wan": (), "dc": ()}, (
        reproduce.Quantity("step", 100.0, "s", "step_time", "wan"),
        reproduce.Quantity("slowdown", 13.0, "x", "slowdown", "wan", "dc"),
        reproduce.Quantity("keeps", 0.25, "x", "throughput_ratio", "wan", "dc"),
    ))
    step, slowdown, keeps = reproduce.table_rows(fake, cells)
    assert (step["simulated"], step["error_pct"], step["within_target"]) == (130.0, pytest.approx(30.0), False)
    assert (slowdown["simulated"], slowdown["error_pct"], slowdown["within_target"]) == (13.0, 0.0, True)
    assert (keeps["simulated"], keeps["error_pct"]) == (0.125, pytest.approx(-50.0))
    assert step["dominant"] == "transfer (60%)"
    assert reproduce.error_pct(91.0, 100.0) == pytest.approx(-9.0)
    cells["dc"]["tokens_per_s_steady"] = None  # a run too short for a steady window
    with pytest.raises(ValueError, match="cell dc has no steady-state rate"):
        reproduce.simulated_value(fake.quantities[2], cells)


def test_steady_step_time_is_the_median_gap_after_the_first_step():
    records = [{"step": 1, "time_s": 50.0}, {"event": "swarm", "time_s": 55.0}, {"step": 2, "time_s": 60.0},
               {"step": 3, "time_s": 72.0}, {"step": 4, "time_s": 82.0}]
    assert reproduce.steady_step_time(records) == 10.0  # gaps 10, 12, 10
    with pytest.raises(ValueError, match="at least 2"):
        reproduce.steady_step_time(records[:1])


def test_a_short_reproduction_writes_its_table_and_its_direct_bytes_match_the_simulator(tmp_path):
    """Two micro-batches of the SSN setting (direct, 1F1B): the report and JSON are written, and the bytes per
    micro-batch from the formula are what the simulator carried: the trainer's tokens and targets to stage 0, S - 1
    forward hops (activations, ids, targets), S - 1 gradients, and the messages' framing."""
    small = ("train.batch_size=16", "train.steps=2")
    ssn = reproduce.REPRODUCTIONS["nanogpt_ssn"]
    short = dataclasses.replace(ssn, cells={"ssn": ssn.cells["ssn"] + small})
    result = reproduce.run_reproduction(short, tmp_path)
    row = result["rows"][0]
    assert row["error_pct"] == pytest.approx(reproduce.error_pct(row["simulated"], 19.889))
    assert json.loads((tmp_path / "nanogpt_ssn.json").read_text())["rows"][0]["published"] == 19.889
    assert "| ReparamSSN k=160, s/step | 19.889 s |" in (tmp_path / "nanogpt_ssn.md").read_text()
    cell = result["cells"]["ssn"]
    assert cell["pipeline"] == "direct, 1f1b"
    run = compose_run_config(*ssn.cells["ssn"], *small)
    (a, ids), s = reproduce.boundary_bytes(run), 8
    payload = 2 * 8 * MB + (s - 1) * (a + ids + 8 * MB) + (s - 1) * a
    requests = (2 * s - 1) * (64 + len("trainer0"))  # header + origin (PipeForwardRequest, PipeBackwardRequest)
    responses = s * (64 + 4 + len("s7p0")) + (s - 1) * (64 + 4)  # PipeResponse: header, loss, the tail's id on forwards
    assert cell["activation_bytes_per_token"] * MB == pytest.approx(payload + requests + responses)
