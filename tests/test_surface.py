"""experiments/surface.py (headline.py --surface): the grid's cells and overrides, the share arithmetic over seeds and
the report, on a fake surface.json (no runs)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from node0sim.app import compose_run_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import surface  # noqa: E402


def test_grid_puts_each_gpu_references_first_and_runs_references_on_their_seeds():
    cells = surface.grid([1, 2], [10.0, 150.0], ["l4", "h100"], ["bfloat16"], [0, 1, 2], [0], 5.0)
    assert len(cells) == 2 * (2 + 2 * 2 * 3)
    assert [c.rtt_ms for c in cells[:2]] == [None, None] and cells[2].rtt_ms == 10.0
    assert {c.gpu for c in cells[:14]} == {"l4"}
    assert {c.seed for c in cells if c.rtt_ms is None} == {0}
    assert len({c.name for c in cells}) == len(cells)


def test_cell_overrides_compose_to_the_intended_run():
    compressed = compose_run_config(*surface.Cell(4, "h100", "float32", 2, 150.0, 5.0).overrides("headline"))
    assert (compressed.network.up_mbps, compressed.network.latency_ms, compressed.network.jitter_ms) == (80, 75.0, 5.0)
    assert (compressed.compression.name, compressed.train.max_inflight, compressed.sim.gpu) == ("subspace", 4, "h100")
    assert (compressed.sim.timing_dtype, compressed.seed) == ("float32", 2)
    dense = compose_run_config(*surface.Cell(4, "h100", "float32", 0).overrides("headline"))
    assert (dense.network.up_mbps, dense.network.jitter_ms, dense.compression.name) == (100000, 0.0, "none")
    # enough steps for a steady window past the fill (2 generations of in-flight micro-batches) and before the drain
    assert (compressed.train.steps, dense.train.steps) == (32, 32)
    assert compose_run_config(*surface.Cell(2, "l4", "bfloat16", 0).overrides("headline")).train.steps == 16


def _data(rates: dict[surface.Cell, float | None]) -> dict:
    return {"experiment": "headline", "cells": {c.name: {"cell": asdict(c), "tokens_per_s_steady": r} for c, r in rates.items()}}


def test_share_is_each_seed_over_the_reference_and_holds_only_when_every_seed_does(tmp_path):
    dense = surface.Cell(2, "l4", "bfloat16", 0)
    near = [surface.Cell(2, "l4", "bfloat16", s, 10.0, 5.0) for s in (0, 1, 2)]
    far = [surface.Cell(2, "l4", "bfloat16", s, 150.0, 5.0) for s in (0, 1, 2)]
    data = _data({dense: 1000.0, **dict(zip(near, (950.0, 920.0, 910.0))), **dict(zip(far, (950.0, 890.0, 990.0)))})
    shares = surface.shares(data)
    assert shares["l4", "bfloat16", 2, 10.0].values == [0.95, 0.92, 0.91]
    assert shares["l4", "bfloat16", 2, 10.0].mean == pytest.approx((0.95 + 0.92 + 0.91) / 3)
    assert shares["l4", "bfloat16", 2, 10.0].holds
    assert not shares["l4", "bfloat16", 2, 150.0].holds  # mean 0.943, but seed 1 keeps only 0.89
    text = surface.report(data, tmp_path)
    assert "**0.927 [0.9100-0.9500]**" in text and "| 0.943 [0.8900-0.9900] |" in text
    assert "The claim holds at 1 of 2 points: l4 bfloat16 in-flight 2 RTT 10 ms." in text
    assert (tmp_path / "surface.png").is_file()


def test_a_cell_without_a_steady_rate_is_an_error_naming_it():
    cell = surface.Cell(4, "l4", "bfloat16", 0, 10.0, 5.0)
    with pytest.raises(ValueError, match=f"surface cell {cell.name}: no steady-state rate"):
        surface.shares(_data({surface.Cell(4, "l4", "bfloat16", 0): 1000.0, cell: None}))


def test_a_point_without_its_reference_is_left_out():
    data = _data({surface.Cell(1, "l4", "bfloat16", 0, 10.0, 5.0): 900.0, surface.Cell(2, "l4", "bfloat16", 0): 1000.0})
    assert surface.shares(data) == {}


def test_a_point_with_fewer_seeds_than_the_grid_says_so(tmp_path):
    dense = surface.Cell(1, "l4", "bfloat16", 0)
    full = {surface.Cell(1, "l4", "bfloat16", s, 10.0, 5.0): 950.0 for s in (0, 1, 2)}
    cut = {surface.Cell(1, "l4", "bfloat16", 0, 50.0, 5.0): 800.0}  # an interrupted grid: seeds 1 and 2 did not run
    text = surface.report(_data({dense: 1000.0, **full, **cut}), tmp_path)
    assert "| **0.950 [0.9500-0.9500]** | 0.800 [0.8000-0.8000] (1 of 3 seeds) |" in text


def _finished(out: Path, cell: surface.Cell, rate: float) -> None:
    from node0sim.summary import SUMMARY_KEYS

    folder = out / "cells" / "surface" / cell.name
    folder.mkdir(parents=True)
    summary = {**{k: None for k in SUMMARY_KEYS}, "tokens_per_s_steady": rate, "sim_time_s": 1.0, "wall_time_s": 1.0,
               "activation_bytes_per_token": 10.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "overrides.json").write_text(json.dumps(cell.overrides("headline")))


def test_finished_cells_are_read_not_rerun_and_parts_of_a_grid_add_up(tmp_path):
    first, second = surface.Cell(2, "l4", "bfloat16", 0), surface.Cell(2, "h100", "bfloat16", 0)
    _finished(tmp_path, first, 1000.0)
    _finished(tmp_path, second, 2000.0)
    surface.run_surface("headline", [first], tmp_path, 1, [])
    data = surface.run_surface("headline", [second], tmp_path, 1, [])
    assert {n: c["tokens_per_s_steady"] for n, c in data["cells"].items()} == {first.name: 1000.0, second.name: 2000.0}
    assert json.loads((tmp_path / "surface.json").read_text()) == data
    folder = tmp_path / "cells" / "surface" / first.name
    assert surface.cached_summary(folder, first.overrides("headline"))["tokens_per_s_steady"] == 1000.0
    assert surface.cached_summary(folder, first.overrides("node0")) is None  # run under another preset: run again
    assert surface.cached_summary(folder, [*first.overrides("headline"), "sim.utilization=0.6"]) is None


def test_the_four_cell_headline_names_a_cell_without_a_steady_rate(tmp_path, monkeypatch):
    import headline

    def fake_run_cell(out: Path, *overrides: str) -> tuple[dict, list]:
        dense_datacenter = "network=datacenter" in overrides and "compression=none" in overrides
        return {"tokens_per_s_steady": None if dense_datacenter else 1000.0, "activation_bytes_per_token": 1.0,
                "sim_time_s": 1.0, "wall_time_s": 1.0}, []

    monkeypatch.setattr(headline, "run_cell", fake_run_cell)
    monkeypatch.setattr(sys, "argv", ["headline.py", "--out", str(tmp_path), "train.max_inflight=4"])
    with pytest.raises(SystemExit, match="cell datacenter/none has no steady-state rate"):
        headline.main()
