"""Tests of the Llama model, its pipeline stages and the analytic cost model."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from node0sim.config import build_section
from node0sim.model import (
    Llama,
    ModelConfig,
    PipelineStage,
    build_stages,
    hidden_bytes,
    stage_backward_flops,
    stage_forward_flops,
    stage_layer_ranges,
    stage_parameter_count,
    stage_shapes,
    stage_state_bytes,
)
from node0sim.model.costs import stage_parameter_shapes
from node0sim.model.llama import stage_weight_shapes
from tests.modelutil import node0_8b, small_config

SEQ = 16


def tiny(**overrides: object) -> ModelConfig:
    return small_config(**{"max_seq_len": SEQ, **overrides})


def tokens(cfg: ModelConfig, batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=gen)


def run_stages(stages: list[PipelineStage], ids: torch.Tensor) -> torch.Tensor:
    x = ids
    for stage in stages:
        x = stage(x)
    return x


# --- config -----------------------------------------------------------------------------


def test_ffn_hidden_dim_8b() -> None:
    assert node0_8b().ffn_hidden_dim == 14336


def test_config_rejects_bad_kv_heads() -> None:
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        tiny(n_kv_heads=3)


def test_config_rejects_non_positive() -> None:
    with pytest.raises(ValueError, match="vocab_size=0"):
        tiny(vocab_size=0)


def test_from_mapping_roundtrip_and_unknown_key() -> None:
    cfg = tiny()
    assert build_section(ModelConfig, dataclasses.asdict(cfg), "model") == cfg
    with pytest.raises(ValueError, match="bogus.*allowed keys.*n_kv_heads"):
        build_section(ModelConfig, {**dataclasses.asdict(cfg), "bogus": 1}, "model")
    partial = dataclasses.asdict(cfg)
    del partial["dim"]
    with pytest.raises(ValueError, match="dim"):
        build_section(ModelConfig, partial, "model")


# --- model and stages ---------------------------------------------------------------------


def test_stage_layer_ranges() -> None:
    assert stage_layer_ranges(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert stage_layer_ranges(4, 1) == [range(0, 4)]
    with pytest.raises(ValueError, match="num_stages=5.*n_layers=4"):
        stage_layer_ranges(4, 5)
    with pytest.raises(ValueError, match="num_stages=0"):
        stage_layer_ranges(4, 0)


def test_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    cfg = tiny()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = Llama(cfg, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = Llama(cfg, seed=7)
    c = Llama(cfg, seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
    wo_std = a.layers[0].attention.wo.weight.std().item()
    assert wo_std == pytest.approx(0.02 / (2 * cfg.n_layers) ** 0.5, rel=0.2)


def test_the_embedding_init_std_scales_only_the_token_embedding() -> None:
    default, node0 = Llama(tiny(), seed=7), Llama(tiny(embedding_init_std=1.0), seed=7)
    assert default.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)  # vocab x dim = 64 x 32 draws
    torch.testing.assert_close(node0.tok_embeddings.weight, default.tok_embeddings.weight / 0.02, atol=1e-6, rtol=1e-5)
    for (name, a), b in zip(list(default.named_parameters())[1:], list(node0.parameters())[1:]):
        assert torch.equal(a, b), name  # the same generator stream: every other weight is unchanged
    with pytest.raises(ValueError, match="embedding_init_std=0"):
        tiny(embedding_init_std=0.0)


@pytest.mark.parametrize("num_stages", [1, 2, 4])
@pytest.mark.parametrize("norm_reorder", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_staged_forward_equals_full_model(num_stages: int, norm_reorder: bool, qk_norm: bool) -> None:
    cfg = tiny(norm_reorder=norm_reorder, qk_norm=qk_norm)
    ids = tokens(cfg)
    expected = Llama(cfg, seed=3)(ids)
    stages = build_stages(cfg, num_stages, seed=3)
    assert [s.is_head for s in stages] == [i == 0 for i in range(num_stages)]
    assert [s.is_tail for s in stages] == [i == num_stages - 1 for i in range(num_stages)]
    logits = run_stages(stages, ids)
    assert logits.shape == (2, SEQ, cfg.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


def test_stages_share_no_parameters() -> None:
    stages = build_stages(tiny(), 2, seed=0)
    ptrs = [{p.data_ptr() for p in s.parameters()} for s in stages]
    assert not ptrs[0] & ptrs[1]


@pytest.mark.parametrize("num_stages", [2, 4])
def test_staged_gradients_equal_full_model(num_stages: int) -> None:
    cfg = tiny(qk_norm=True, norm_reorder=True)
    ids = tokens(cfg)
    targets = tokens(cfg, seed=2)
    model = Llama(cfg, seed=5)
    stages = build_stages(cfg, num_stages, seed=5)
    full_loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    full_loss.backward()
    staged_loss = stages[-1].loss(run_stages(stages, ids), targets)
    staged_loss.backward()
    torch.testing.assert_close(staged_loss, full_loss, atol=1e-6, rtol=0)
    full_grads = {name: p.grad for name, p in model.named_parameters()}
    seen = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, full_grads[name], atol=1e-6, rtol=0, msg=name)
            seen.add(name)
    assert seen == set(full_grads)


def test_untrainable_rmsnorm_has_no_norm_parameters() -> None:
    cfg = tiny(trainable_rmsnorm=False, qk_norm=True)
    names = [name for name, _ in Llama(cfg, seed=0).named_parameters()]
    assert not [n for n in names if "norm" in n]
    assert any("norm" in n for n, _ in Llama(tiny(qk_norm=True), seed=0).named_parameters())


def test_causality() -> None:
    cfg = tiny(qk_norm=True)
    model = Llama(cfg, seed=0)
    ids = tokens(cfg)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % cfg.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_only_on_tail() -> None:
    cfg = tiny()
    stages = build_stages(cfg, 2, seed=0)
    hidden = stages[0](tokens(cfg))
    with pytest.raises(RuntimeError, match="stage 0"):
        stages[0].loss(hidden, tokens(cfg))
    loss = stages[1].loss(stages[1](hidden), tokens(cfg))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_bad_inputs_raise() -> None:
    cfg = tiny()
    head, body, _ = build_stages(tiny(n_layers=3), 3, seed=0)
    ids = tokens(cfg)
    good_hidden = head(ids)
    with pytest.raises(ValueError, match=r"stage 1 expected hidden of shape \[B, T, 32\] float32, got \(2, 16, 16\)"):
        body(torch.zeros(2, SEQ, 16))
    with pytest.raises(ValueError, match="stage 1 .*float64"):
        body(good_hidden.double())
    with pytest.raises(ValueError, match="stage 0 .*dtype torch.float32"):
        head(ids.float())
    nan_hidden = good_hidden.detach().clone()
    nan_hidden[0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="stage 1 .*non-finite"):
        body(nan_hidden)
    bad_ids = ids.clone()
    bad_ids[1, 2] = cfg.vocab_size
    with pytest.raises(ValueError, match="stage 0 .*out of range"):
        head(bad_ids)
    with pytest.raises(ValueError, match="stage 0 .*out of range"):
        head(ids - 1 - ids.max())
    with pytest.raises(ValueError, match="stage 0 .*sequence length 17"):
        head(torch.zeros(1, SEQ + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="stage 1 .*sequence length 17"):
        body(torch.zeros(1, SEQ + 1, cfg.dim))
    with pytest.raises(ValueError, match="stage 0 .*shape"):
        head(ids[0])


# --- costs -------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("num_stages", [1, 3])
def test_parameter_count_matches_modules(qk_norm: bool, trainable: bool, num_stages: int) -> None:
    cfg = tiny(qk_norm=qk_norm, trainable_rmsnorm=trainable, ffn_dim_multiplier=1.3)
    model = Llama(cfg, seed=0)
    (shape,) = stage_shapes(cfg, 1)
    assert stage_parameter_count(cfg, *shape) == sum(p.numel() for p in model.parameters())
    stages = build_stages(cfg, num_stages, seed=0)
    for stage, shape in zip(stages, stage_shapes(cfg, num_stages)):
        assert shape == (stage.layer_range, stage.is_head, stage.is_tail)
        assert stage_parameter_count(cfg, *shape) == sum(p.numel() for p in stage.parameters())


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
def test_weight_shapes_are_the_modules_parameter_shapes(qk_norm: bool, trainable: bool) -> None:
    cfg = tiny(qk_norm=qk_norm, trainable_rmsnorm=trainable)
    for stage in build_stages(cfg, 3, seed=0):
        _assert_shapes_match(cfg, stage)


def test_node0_8b_weight_shapes_are_the_modules_parameter_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 8B model built on the meta device: parameter shapes without any tensor storage."""
    cfg = node0_8b(trainable_rmsnorm=True)
    monkeypatch.setattr(torch.nn.utils, "skip_init", lambda module_cls, *args, **kwargs: module_cls(*args, **kwargs))
    monkeypatch.setattr(Llama, "_init_weights", lambda self, seed: None)
    with torch.device("meta"):
        model = Llama(cfg, seed=0)
    for index in (0, 1, 31):
        _assert_shapes_match(cfg, PipelineStage(model, index, 32))


def _assert_shapes_match(cfg: ModelConfig, stage: PipelineStage) -> None:
    actual = [(name, tuple(p.shape)) for name, p in stage.named_parameters()]
    assert list(stage_weight_shapes(cfg, stage.layer_range, stage.is_head, stage.is_tail).items()) == actual
    assert stage_parameter_shapes(cfg, stage.layer_range, stage.is_head, stage.is_tail) == [shape for _, shape in actual]


def test_8b_parameter_count() -> None:
    cfg = node0_8b()
    (single,) = stage_shapes(cfg, 1)
    total = stage_parameter_count(cfg, *single)
    assert sum(stage_parameter_count(cfg, *s) for s in stage_shapes(cfg, 32)) == total
    # By hand: per layer q,o 4096^2 each; k,v 4096*1024 each; SwiGLU 3*4096*14336; untied embedding + LM head.
    per_layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert total == 32 * per_layer + 2 * 50265 * 4096  # about 7.39e9
    assert stage_state_bytes(cfg, *single) == total * 4 * 3


def test_forward_flops_one_layer_by_hand() -> None:
    cfg = tiny()  # dim 32, 4 heads of 8, 2 kv heads (kv width 16), ffn int(256/3)=85 -> 96
    assert cfg.ffn_hidden_dim == 96
    batch, seq = 2, SEQ
    tok = batch * seq
    macs_per_token = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 96
    attention = 2 * 2 * batch * seq * seq * 32
    body = 2 * tok * macs_per_token + attention
    assert stage_forward_flops(cfg, range(1, 2), False, False, batch, seq) == body
    assert stage_forward_flops(cfg, range(0, 1), True, False, batch, seq) == body  # embedding lookup is free
    assert stage_forward_flops(cfg, range(3, 4), False, True, batch, seq) == body + 2 * tok * 32 * 64
    for shape in stage_shapes(cfg, 2):
        fwd = stage_forward_flops(cfg, *shape, batch, seq)
        assert stage_backward_flops(cfg, *shape, batch, seq) == 2 * fwd
    assert hidden_bytes(cfg, batch, seq, 2) == batch * seq * 32 * 2


def test_8b_costs_are_instant() -> None:
    cfg = node0_8b()
    start = time.perf_counter()
    for shape in stage_shapes(cfg, 8):
        stage_parameter_count(cfg, *shape)
        stage_forward_flops(cfg, *shape, 8, 1024)
        stage_backward_flops(cfg, *shape, 8, 1024)
        stage_state_bytes(cfg, *shape)
    assert time.perf_counter() - start < 0.1
    total_fwd = sum(stage_forward_flops(cfg, *s, 1, 1024) for s in stage_shapes(cfg, 8))
    n_params = stage_parameter_count(cfg, *stage_shapes(cfg, 1)[0])
    # Kaplan et al.: forward ~ 2 * (non-embedding params) per token, plus attention and LM head terms.
    assert 2 * n_params * 1024 * 0.9 < total_fwd < 2 * n_params * 1024 * 1.2
