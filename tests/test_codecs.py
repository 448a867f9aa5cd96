"""Tests of the boundary wire codecs: byte counts, timing specs, reconstruction error, wire validation."""

from __future__ import annotations

import math

import pytest
import torch

from node0sim.model.subspace import make_basis
from node0sim.protocol.codecs import (
    CODEC_NAMES,
    Codec,
    DenseCodec,
    QuantizeCodec,
    RandomProjectionCodec,
    SubspaceCodec,
    TopKCodec,
    make_codec,
    rank_for,
)
from node0sim.protocol.messages import Packed, TensorSpec, payload_bytes

B, T, DIM, VOCAB = 2, 8, 64, 50


def activations(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


def all_codecs(rate: float = 8.0) -> list[Codec]:
    basis = make_basis(DIM, rank_for(DIM, rate), VOCAB, seed=0)
    codecs = [make_codec(name, DIM, rate, basis=basis) for name in CODEC_NAMES]
    return codecs + [make_codec("quantize", DIM, rate, bits=4)]


def relative_error(codec: Codec, x: torch.Tensor) -> float:
    ids = token_ids()
    return ((codec.decode(codec.encode(x, ids), ids) - x).norm() / x.norm()).item()


# --- bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [4, 8, 16])
def test_subspace_bytes_are_one_over_rate_of_dense(rate: int) -> None:
    basis = make_basis(DIM, rank_for(DIM, rate), VOCAB, seed=0)
    codec = make_codec("subspace", DIM, rate, basis=basis)
    wire = codec.encode(activations(), token_ids())
    assert wire.shape == (B, T, DIM // rate)
    assert payload_bytes(wire) * rate == payload_bytes(activations()) == B * T * DIM * 4
    ids_on_wire = token_ids().to(torch.int32)  # travel beside the payload, 4 B per token
    assert payload_bytes(wire, ids_on_wire) == B * T * (DIM // rate * 4 + 4)
    assert codec.encode_grad(activations()).shape == (B, T, DIM // rate)


def test_rank_is_floor_of_dim_over_rate() -> None:
    assert rank_for(4096, 100) == 40 and rank_for(64, 8) == 8 and rank_for(64, 1000) == 1
    assert make_codec("random_projection", 4096, 100).rank == 40


@pytest.mark.parametrize("rate", [2, 4, 10])
def test_topk_bytes_fit_the_budget(rate: int) -> None:
    codec = make_codec("topk", DIM, rate)
    assert codec.keep == math.floor(DIM * 4 / rate / 6)
    wire = codec.encode(activations())
    dense = B * T * DIM * 4
    assert wire.parts["indices"].dtype == torch.int16
    assert dense / rate - B * T * 6 < payload_bytes(wire) <= dense / rate


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_bytes(bits: int) -> None:
    wire = make_codec("quantize", DIM, rate=1, bits=bits).encode(activations())
    assert payload_bytes(wire) == B * T * (DIM * bits // 8 + 4)
    assert payload_bytes(wire) / payload_bytes(activations()) == pytest.approx(bits / 32, abs=4 / (4 * DIM))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timing_specs_match_real_payload_bytes(dtype: torch.dtype) -> None:
    x, ids = activations(dtype=dtype), token_ids()
    for codec in all_codecs():
        spec = codec.activation_spec(B, T, DIM, dtype)
        grad_spec = codec.grad_spec(B, T, DIM, dtype)
        for payload in (spec, grad_spec):
            parts = payload.parts.values() if isinstance(payload, Packed) else [payload]
            assert all(isinstance(part, TensorSpec) for part in parts), codec
        assert payload_bytes(spec) == payload_bytes(codec.encode(x, ids)), codec
        assert payload_bytes(grad_spec) == payload_bytes(codec.encode_grad(x)), codec


def test_timing_specs_at_node0_scale_need_no_basis() -> None:
    dense = 8 * 4096 * 4096 * 2
    for name in CODEC_NAMES:
        codec = make_codec(name, 4096, 100, activation_bytes=2)
        spec = codec.activation_spec(8, 4096, 4096, torch.bfloat16)
        assert payload_bytes(spec) == payload_bytes(codec.grad_spec(8, 4096, 4096, torch.bfloat16))
        expected = {
            "none": dense,
            "subspace": 8 * 4096 * 40 * 2,
            "random_projection": 8 * 4096 * 40 * 2,
            "topk": 8 * 4096 * 20 * 4,  # keep = floor(4096 * 2 / 100 / 4) = 20
            "quantize": 8 * 4096 * (4096 + 4),
        }[name]
        assert payload_bytes(spec) == expected, name
    with pytest.raises(RuntimeError, match="without a basis"):
        make_codec("subspace", 4096, 100).encode(torch.zeros(1, 1, 4096), torch.zeros(1, 1, dtype=torch.long))


# --- reconstruction -------------------------------------------------------------------------------


def test_exact_codecs_round_trip() -> None:
    x = activations()
    assert torch.equal(DenseCodec().decode(DenseCodec().encode(x)), x)
    assert torch.equal(DenseCodec().decode_grad(DenseCodec().encode_grad(x)), x)
    assert torch.equal(TopKCodec(DIM).decode(TopKCodec(DIM).encode(x)), x)
    basis = make_basis(DIM, 8, VOCAB, seed=0)
    ids = token_ids()
    in_subspace = torch.randn(B, T, 8) @ basis.basis.T + basis.fixed_embedding[ids]
    codec = SubspaceCodec(8, basis)
    assert (codec.decode(codec.encode(in_subspace, ids), ids.to(torch.int32)) - in_subspace).abs().max() <= 1e-5
    g = activations(3)
    projected = g @ basis.basis @ basis.basis.T
    torch.testing.assert_close(codec.decode_grad(codec.encode_grad(g)), projected)


def test_lossy_codecs_have_bounded_nonzero_error() -> None:
    x = activations()
    for codec in [c for c in all_codecs() if c.name in ("random_projection", "topk", "quantize")]:
        error = relative_error(codec, x)
        assert 0 < error < 1, codec
        g = activations(5)
        grad_error = ((codec.decode_grad(codec.encode_grad(g)) - g).norm() / g.norm()).item()
        assert 0 < grad_error < 1, codec


def test_topk_error_falls_as_keep_grows() -> None:
    x = activations()
    errors = [relative_error(TopKCodec(keep), x) for keep in (4, 8, 16, 32, 48)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    kept = TopKCodec(4).decode(TopKCodec(4).encode(x))
    assert ((kept != 0).sum(-1) == 4).all()
    assert (kept.abs().amax(-1) == x.abs().amax(-1)).all()


def test_quantization_error_is_within_half_a_step() -> None:
    x = activations()
    int8, int4 = QuantizeCodec(8), QuantizeCodec(4)
    assert relative_error(int8, x) < relative_error(int4, x)
    for codec in (int8, int4):
        step = x.abs().amax(-1, keepdim=True) / codec.qmax
        assert ((codec.decode(codec.encode(x)) - x).abs() <= step / 2 + 1e-6).all()
    zeros = torch.zeros(B, T, DIM)
    assert torch.equal(int4.decode(int4.encode(zeros)), zeros)


# --- validation ---------------------------------------------------------------------------------


def test_subspace_decode_rejects_bad_wires() -> None:
    codec = SubspaceCodec(16, make_basis(DIM, 16, VOCAB, seed=0))
    ids = token_ids()
    with pytest.raises(ValueError, match=r"subspace codec expected compressed activations of shape \[B, T, 16\].*got \(2, 8, 32\)"):
        codec.decode(torch.zeros(B, T, 32), ids)
    with pytest.raises(ValueError, match="got .* int32"):
        codec.decode(torch.zeros(B, T, 16, dtype=torch.int32), ids)
    bad = torch.zeros(B, T, 16)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        codec.decode(bad, ids)
    with pytest.raises(ValueError, match="compressed gradients.*16"):
        codec.decode_grad(torch.zeros(B, T, DIM))
    with pytest.raises(ValueError, match="token ids of shape"):
        codec.decode(torch.zeros(B, T, 16), ids[:, :4])
    with pytest.raises(ValueError, match="needs the micro-batch's token ids"):
        codec.encode(activations(), None)
    with pytest.raises(ValueError, match="out of range"):
        codec.decode(torch.zeros(B, T, 16), ids + VOCAB)
    with pytest.raises(ValueError, match=r"shape \[B, T, 64\]"):
        codec.encode(torch.zeros(B, T, 32), ids)


def test_dense_and_topk_and_quantize_reject_bad_wires() -> None:
    with pytest.raises(ValueError, match="none codec expected activations"):
        DenseCodec().decode(torch.zeros(B, DIM))
    with pytest.raises(ValueError, match="non-finite"):
        DenseCodec().decode_grad(torch.full((B, T, DIM), float("inf")))

    topk = TopKCodec(8)
    wire = topk.encode(activations())
    with pytest.raises(ValueError, match="indices of shape .* int16, got .* int64"):
        topk.decode(Packed({**wire.parts, "indices": wire.parts["indices"].long()}, wire.shape))
    with pytest.raises(ValueError, match="out of range"):
        topk.decode(Packed({**wire.parts, "indices": wire.parts["indices"] + DIM}, wire.shape))
    with pytest.raises(ValueError, match=r"values of shape \[2, 8, 8\]"):
        topk.decode(Packed({**wire.parts, "values": wire.parts["values"][..., :4]}, wire.shape))
    with pytest.raises(ValueError, match="parts 'values' and 'indices'"):
        topk.decode(activations())
    with pytest.raises(ValueError, match="int16"):
        TopKCodec(8).activation_spec(1, 1, 40000, torch.float32)

    int4 = QuantizeCodec(4)
    wire = int4.encode(activations())
    assert wire.parts["values"].shape == (B, T, DIM // 2) and wire.parts["values"].dtype == torch.uint8
    with pytest.raises(ValueError, match=r"values of shape \(2, 8, 32\) uint8, got \(2, 8, 64\) int8"):
        int4.decode(QuantizeCodec(8).encode(activations()))
    with pytest.raises(ValueError, match="non-finite"):
        int4.decode_grad(Packed({**wire.parts, "scales": torch.full((B, T, 1), float("nan"))}, wire.shape))
    with pytest.raises(ValueError, match="even dim"):
        int4.encode(torch.zeros(B, T, 63))


def test_make_codec_validates() -> None:
    with pytest.raises(ValueError, match=r"unknown codec 'zip'.*'subspace'"):
        make_codec("zip", DIM, 8)
    with pytest.raises(ValueError, match="rate"):
        make_codec("topk", DIM, 0.5)
    with pytest.raises(ValueError, match="rank 8 does not match the basis's rank 16"):
        make_codec("subspace", DIM, 8, basis=make_basis(DIM, 16, VOCAB, seed=0))
    with pytest.raises(ValueError, match="bits"):
        make_codec("quantize", DIM, 8, bits=2)
    assert isinstance(make_codec("random_projection", DIM, 8), RandomProjectionCodec)
    assert make_codec("subspace", DIM, 8).needs_token_ids and not make_codec("random_projection", DIM, 8).needs_token_ids
