"""Compression end to end through the CLI config: bytes measured on the wire, training, errors."""

import pytest

from node0sim.config import ConfigError
from node0sim.model.subspace import make_basis, save_basis
from tests.runs import simulate

SMALL = ("train.steps=6", "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=64", "train.eval_batches=1")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("dense"), *SMALL)


@pytest.mark.parametrize("rate", [8, 32])
def test_subspace_sends_about_one_rate_th_of_the_dense_bytes(tmp_path, dense, rate):
    compressed = simulate(tmp_path, *SMALL, "compression=subspace", f"compression.rate={rate}")
    ratio = dense["activation_bytes_per_token"] / compressed["activation_bytes_per_token"]
    # token ids (4 B per token and hop) and headers keep it a little under the rate
    assert 0.6 * rate < ratio <= rate
    assert compressed["loss_last"] < compressed["loss_first"]
    assert compressed["tokens_per_s"] > dense["tokens_per_s"]  # 80 Mb/s links: bytes are the bottleneck


@pytest.mark.parametrize("codec", ["random_projection", "topk", "quantize"])
def test_lossy_baselines_run_and_count_their_bytes(tmp_path, dense, codec):
    summary = simulate(tmp_path, *SMALL, f"compression={codec}", "compression.rate=8")
    assert summary["compression"] == codec and summary["val_loss"] is not None
    ratio = dense["activation_bytes_per_token"] / summary["activation_bytes_per_token"]
    assert 2.5 < ratio < 9.0  # quantize int8 is ~4x whatever the rate; top-k keeps floor(budget) entries


def test_timing_mode_node0_8b_compression_at_rate_100(tmp_path):
    common = ("model=node0_8b", "sim.numerics=false", "topology.num_stages=32", "train.steps=1",
              "train.batch_size=1", "train.micro_batch_size=1", "train.seq_len=4096")
    dense = simulate(tmp_path / "d", *common)
    compressed = simulate(tmp_path / "c", *common, "compression=subspace", "compression.rate=100")
    saved = 1 - compressed["activation_bytes_per_token"] / dense["activation_bytes_per_token"]
    assert saved >= 0.98  # k=40 bf16 values + int32 ids instead of 4096 bf16 values


def test_basis_file_is_used_and_a_mismatching_one_is_refused(tmp_path):
    good = tmp_path / "basis.pt"
    save_basis(make_basis(128, 16, 257, seed=5), good)
    summary = simulate(tmp_path / "ok", *SMALL, "compression=subspace", "compression.rate=8", f"compression.basis={good}")
    assert summary["steps"] == 6
    wrong = tmp_path / "wrong.pt"
    save_basis(make_basis(128, 8, 257, seed=5), wrong)
    with pytest.raises(ConfigError, match="compression.basis.*wrong.pt"):
        simulate(tmp_path / "bad", *SMALL, "compression=subspace", "compression.rate=8", f"compression.basis={wrong}")


@pytest.mark.parametrize("override,key", [("compression.rate=0.5", "compression.rate"), ("compression.bits=3", "compression.bits")])
def test_bad_compression_values_name_their_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        simulate(tmp_path, *SMALL, "compression=quantize", override)
