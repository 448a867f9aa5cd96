"""Tests of the Protocol Models subspace constraint: basis, fixed embedding, projection, exact boundary codec."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from node0sim.model import Llama, ModelConfig, PipelineStage, build_stages
from node0sim.model.subspace import (
    SubspaceBasis,
    constrained_weights,
    load_basis,
    load_basis_from_hub,
    make_basis,
    project_onto_subspace_,
    save_basis,
    subspace_residual,
)
from node0sim.protocol.codecs import Codec, RandomProjectionCodec, SubspaceCodec
from tests.modelutil import small_config

DIM, VOCAB, RANK, SEQ, STAGES = 64, 300, 8, 16, 4
EXACT = 1e-5


def config(norm_reorder: bool = True, trainable_rmsnorm: bool = False) -> ModelConfig:
    return small_config(
        name="tiny-ssn", vocab_size=VOCAB, dim=DIM, max_seq_len=SEQ, qk_norm=True, norm_reorder=norm_reorder,
        trainable_rmsnorm=trainable_rmsnorm,
    )


def constrained_stages(basis: SubspaceBasis, norm_reorder: bool = True, trainable_rmsnorm: bool = False) -> list[PipelineStage]:
    stages = build_stages(config(norm_reorder, trainable_rmsnorm), STAGES, seed=1, fixed_embedding=basis.fixed_embedding)
    for stage in stages:
        project_onto_subspace_(stage, basis)
    return stages


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (3, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def boundary_outputs(stages: list[PipelineStage], ids: torch.Tensor) -> list[torch.Tensor]:
    """Activations leaving every non-tail stage."""
    outputs = []
    h = ids
    with torch.no_grad():
        for stage in stages[:-1]:
            h = stage(h)
            outputs.append(h)
    return outputs


def max_reconstruction_error(codec: Codec, stages: list[PipelineStage], ids: torch.Tensor) -> float:
    errors = [(codec.decode(codec.encode(x, ids), ids) - x).abs().max().item() for x in boundary_outputs(stages, ids)]
    return max(errors)


class _Wire(torch.autograd.Function):
    """A stage boundary: forward through encode/decode, backward through encode_grad/decode_grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, codec: Codec) -> torch.Tensor:  # type: ignore[override]
        ctx.codec = codec
        return codec.decode(codec.encode(x.detach(), ids), ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.codec.decode_grad(ctx.codec.encode_grad(grad)), None, None


def pipeline_loss(stages: list[PipelineStage], ids: torch.Tensor, targets: torch.Tensor, codec: Codec | None) -> torch.Tensor:
    h = ids
    for stage in stages[:-1]:
        h = stage(h)
        if codec is not None:
            h = _Wire.apply(h, ids, codec)
    return stages[-1].loss(stages[-1](h), targets)


# --- the fixed embedding in the model ---------------------------------------------------------


def test_fixed_embedding_is_a_buffer_added_to_the_embedding() -> None:
    cfg = config()
    basis = make_basis(DIM, RANK, VOCAB, seed=0)
    plain = Llama(cfg, seed=2)
    model = Llama(cfg, seed=2, fixed_embedding=basis.fixed_embedding)
    assert "fixed_embedding" not in plain.state_dict()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert torch.equal(model.state_dict()["fixed_embedding"], basis.fixed_embedding)
    assert not any(p is model.fixed_embedding for p in model.parameters())
    ids, _ = batch(0)
    stages = build_stages(cfg, STAGES, seed=2, fixed_embedding=basis.fixed_embedding)
    assert torch.equal(stages[0].fixed_embedding, basis.fixed_embedding)
    assert all(stage.fixed_embedding is None for stage in stages[1:])
    assert "fixed_embedding" in stages[0].state_dict() and "fixed_embedding" not in stages[1].state_dict()
    h = ids
    with torch.no_grad():
        for stage in stages:
            h = stage(h)
        torch.testing.assert_close(h, model(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(h, plain(ids), atol=1e-3)


def test_fixed_embedding_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"\(300, 64\), got \(300, 32\)"):
        Llama(config(), seed=0, fixed_embedding=torch.zeros(VOCAB, 32))


# --- the basis --------------------------------------------------------------------------------


def test_peers_with_the_same_seed_agree() -> None:
    rng_state = torch.get_rng_state()
    a = make_basis(DIM, RANK, VOCAB, seed=5)
    b = make_basis(DIM, RANK, VOCAB, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.equal(a.basis, b.basis) and torch.equal(a.fixed_embedding, b.fixed_embedding)
    assert a.fingerprint() == b.fingerprint()
    c = make_basis(DIM, RANK, VOCAB, seed=6)
    assert not torch.equal(a.basis, c.basis) and not torch.equal(a.fixed_embedding, c.fixed_embedding)
    assert a.fingerprint() != c.fingerprint()
    assert (a.dim, a.rank, a.vocab_size, a.seed) == (DIM, RANK, VOCAB, 5)
    assert a.basis.dtype == torch.float32 and a.fixed_embedding.dtype == torch.float32
    assert (a.basis.T @ a.basis - torch.eye(RANK)).abs().max().item() <= 1e-6
    assert 0.9 < a.fixed_embedding.std().item() < 1.1
    assert 0.45 < make_basis(DIM, RANK, VOCAB, seed=5, fixed_std=0.5).fixed_embedding.std().item() < 0.55


def test_make_basis_validates_rank() -> None:
    for rank in (0, DIM + 1):
        with pytest.raises(ValueError, match="1 <= rank <= dim"):
            make_basis(DIM, rank, VOCAB, seed=0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    basis = make_basis(DIM, RANK, VOCAB, seed=3)
    path = tmp_path / "basis.pt"
    save_basis(basis, path)
    loaded = load_basis(path, DIM, RANK, VOCAB)
    assert torch.equal(loaded.basis, basis.basis) and torch.equal(loaded.fixed_embedding, basis.fixed_embedding)
    assert loaded.seed == 3 and loaded.fingerprint() == basis.fingerprint()


def test_load_refuses_a_basis_for_another_run(tmp_path: Path) -> None:
    path = tmp_path / "basis.pt"
    save_basis(make_basis(DIM, RANK, VOCAB, seed=3), path)
    with pytest.raises(ValueError, match=r"basis\.pt.*rank 8 \(run expects 16\)"):
        load_basis(path, DIM, 16, VOCAB)
    with pytest.raises(ValueError, match=r"basis\.pt.*dim 64 \(run expects 32\)"):
        load_basis(path, 32, RANK, VOCAB)
    with pytest.raises(ValueError, match=r"basis\.pt.*vocab_size 300 \(run expects 301\)"):
        load_basis(path, DIM, RANK, VOCAB + 1)


def test_load_refuses_tampered_or_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "tampered.pt"
    save_basis(make_basis(DIM, RANK, VOCAB, seed=3), path)
    data = torch.load(path, weights_only=True)
    data["fixed_embedding"][7, 3] += 1.0
    torch.save(data, path)
    with pytest.raises(ValueError, match=r"tampered\.pt.*corrupt"):
        load_basis(path, DIM, RANK, VOCAB)

    skewed = make_basis(DIM, RANK, VOCAB, seed=3)
    not_orthonormal = SubspaceBasis(skewed.basis * 1.01, skewed.fixed_embedding, seed=3)
    save_basis(not_orthonormal, tmp_path / "skewed.pt")
    with pytest.raises(ValueError, match=r"skewed\.pt.*not orthonormal"):
        load_basis(tmp_path / "skewed.pt", DIM, RANK, VOCAB)

    torch.save({"basis": skewed.basis}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt.*expected keys"):
        load_basis(tmp_path / "partial.pt", DIM, RANK, VOCAB)

    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"garbage\.pt.*could not be read"):
        load_basis(tmp_path / "garbage.pt", DIM, RANK, VOCAB)


def _cache_on_hub_layout(cache: Path, repo_id: str, filename: str, basis: SubspaceBasis) -> None:
    """Lay ``basis`` out as huggingface_hub's cache would after downloading it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_basis(basis, snapshot / filename)


def test_load_from_hub_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    basis = make_basis(DIM, RANK, VOCAB, seed=4)
    _cache_on_hub_layout(tmp_path, "someone/ssn-basis", "subspace_comp.pt", basis)
    loaded = load_basis_from_hub("someone/ssn-basis", "subspace_comp.pt", DIM, RANK, VOCAB, cache_dir=tmp_path)
    assert loaded.fingerprint() == basis.fingerprint()
    with pytest.raises(RuntimeError, match=r"someone/missing.*local basis file.*make_basis"):
        load_basis_from_hub("someone/missing", "subspace_comp.pt", DIM, RANK, VOCAB, cache_dir=tmp_path)


# --- the constraint ----------------------------------------------------------------------------


def test_constrained_weights_are_the_boundary_crossing_projections() -> None:
    stages = build_stages(config(), STAGES, seed=0)
    names = [[w.name for w in constrained_weights(stage)] for stage in stages]
    assert names[0] == ["tok_embeddings.weight", "layers.0.attention.wo.weight", "layers.0.feed_forward.w2.weight"]
    assert names[1] == ["layers.1.attention.wo.weight", "layers.1.feed_forward.w2.weight"]
    assert names[3] == []  # the tail stays full rank
    params = dict(stages[1].named_parameters())
    assert all(w.param is params[w.name] for w in constrained_weights(stages[1]))


def test_projection_needs_the_bases_fixed_embedding() -> None:
    basis = make_basis(DIM, RANK, VOCAB, seed=0)
    with pytest.raises(ValueError, match="fixed_embedding"):
        project_onto_subspace_(build_stages(config(), STAGES, seed=0)[0], basis)
    other = make_basis(DIM, RANK, VOCAB, seed=1)
    with pytest.raises(ValueError, match="fixed_embedding"):
        project_onto_subspace_(build_stages(config(), STAGES, seed=0, fixed_embedding=other.fixed_embedding)[0], basis)
    with pytest.raises(ValueError, match="dim"):
        project_onto_subspace_(build_stages(config(), STAGES, seed=0)[1], make_basis(32, 4, VOCAB, seed=0))


@pytest.mark.parametrize("norm_reorder", [True, False])
def test_reconstruction_is_exact_at_init_and_after_adamw_steps(norm_reorder: bool) -> None:
    basis = make_basis(DIM, RANK, VOCAB, seed=0)
    codec = SubspaceCodec(RANK, basis)
    stages = constrained_stages(basis, norm_reorder=norm_reorder)
    ids, targets = batch(0)
    assert max_reconstruction_error(codec, stages, ids) <= EXACT
    assert max(subspace_residual(x, ids, basis) for x in boundary_outputs(stages, ids)) <= EXACT
    optimizers = [torch.optim.AdamW(stage.parameters(), lr=1e-2, weight_decay=0.1) for stage in stages]
    before = boundary_outputs(stages, ids)
    for step in range(5):
        ids, targets = batch(step + 1)
        pipeline_loss(stages, ids, targets, codec=None).backward()
        for stage, optimizer in zip(stages, optimizers):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            project_onto_subspace_(stage, basis)
        assert max_reconstruction_error(codec, stages, ids) <= EXACT, f"after step {step + 1}"
    moved = [(a - b).abs().max().item() for a, b in zip(boundary_outputs(stages, batch(0)[0]), before)]
    assert min(moved) > 1e-2  # the steps did change the activations


def test_unprojected_adamw_step_breaks_reconstruction() -> None:
    basis = make_basis(DIM, RANK, VOCAB, seed=0)
    stages = constrained_stages(basis)
    ids, targets = batch(1)
    pipeline_loss(stages, ids, targets, codec=None).backward()
    for stage in stages:
        torch.optim.AdamW(stage.parameters(), lr=1e-2).step()
    assert max_reconstruction_error(SubspaceCodec(RANK, basis), stages, ids) > 1e-2


def test_without_subtracting_the_fixed_embedding_reconstruction_fails() -> None:
    basis = make_basis(DIM, RANK, VOCAB, seed=0)
    stages = constrained_stages(basis)
    ids, _ = batch(0)
    assert max_reconstruction_error(RandomProjectionCodec(RANK, basis), stages, ids) > 1e-2


def test_trainable_norm_gain_after_the_projection_breaks_the_invariant() -> None:
    basis = make_basis(DIM, RANK, VOCAB, seed=0)
    stages = constrained_stages(basis, norm_reorder=True, trainable_rmsnorm=True)
    codec = SubspaceCodec(RANK, basis)
    ids, _ = batch(0)
    assert max_reconstruction_error(codec, stages, ids) <= EXACT  # unit gains are still a scalar per token
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for stage in stages:
            for name, param in stage.named_parameters():
                if name.endswith(("attention_norm.weight", "ffn_norm.weight")):
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            project_onto_subspace_(stage, basis)
    assert max_reconstruction_error(codec, stages, ids) > 1e-2


@pytest.mark.parametrize("norm_reorder", [True, False])
def test_parameter_gradients_through_the_codec_are_exact(norm_reorder: bool) -> None:
    """Gradients with the codec at every boundary equal those of the same constrained model without it.

    For unconstrained parameters they are equal as they stand. For constrained ones (``wo``, ``w2``,
    the embedding) only the component inside span(U), the directions the constraint lets them move
    in, is comparable: the codec drops the rest (dL/dX outside span(U)), which the projection after
    each step would remove anyway for plain gradient descent.
    """
    basis = make_basis(DIM, RANK, VOCAB, seed=0)
    u = basis.basis
    codec = SubspaceCodec(RANK, basis)
    ids, targets = batch(2)
    grads = []
    for wire_codec in (None, codec):
        stages = constrained_stages(basis, norm_reorder=norm_reorder)
        pipeline_loss(stages, ids, targets, wire_codec).backward()
        grads.append(stages)
    dense, wired = grads
    constrained_dropped = []
    for stage_dense, stage_wired in zip(dense, wired):
        axes = {w.name: w.model_axis for w in constrained_weights(stage_dense)}
        wired_params = dict(stage_wired.named_parameters())
        for name, param in stage_dense.named_parameters():
            expected, actual = param.grad, wired_params[name].grad
            if name in axes:
                project = (lambda g: u @ (u.T @ g)) if axes[name] == 0 else (lambda g: (g @ u) @ u.T)
                constrained_dropped.append((expected - actual).norm().item() / expected.norm().item())
                expected, actual = project(expected), project(actual)
            error = (expected - actual).norm().item() / expected.norm().item()
            assert error <= 1e-5, f"stage {stage_dense.index} {name}: relative gradient error {error:.2e}"
    assert max(constrained_dropped) > 1e-2  # the codec really changed the raw gradients of constrained weights


def _outside_span(t: torch.Tensor, model_axis: int, u: torch.Tensor) -> float:
    """Largest entry of the part of ``t`` outside span(U) along ``model_axis``, relative to ``t``'s largest entry."""
    return (t - (u @ (u.T @ t) if model_axis == 0 else (t @ u) @ u.T)).abs().max().item() / t.abs().max().item()


@pytest.mark.parametrize("project_gradients", [True, False])
def test_gradients_projected_before_the_step_or_only_the_weights_after_it(project_gradients: bool) -> None:
    from node0sim.protocol.codecs import DenseCodec
    from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute

    basis = make_basis(DIM, RANK, VOCAB, seed=5)
    head = build_stages(config(), STAGES, seed=1, fixed_embedding=basis.fixed_embedding)[0]
    compute = TensorStageCompute(head, OptimConfig(warmup_steps=0), DenseCodec(), basis, project_gradients=project_gradients)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    compute.backward(ids, None, torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(3)))
    compute.apply_update(2)
    for weight in constrained_weights(head):
        moment = compute.optimizer.state[weight.param]["exp_avg"]
        # Adam's first moment holds the gradient's part outside span(U) only when gradients are not projected
        assert (_outside_span(moment, weight.model_axis, basis.basis) > 1e-3) != project_gradients, weight.name
    with torch.no_grad():  # either way the weights are projected after the step: reconstruction stays exact
        assert subspace_residual(head(ids), ids, basis) <= EXACT


def test_every_stage_of_a_run_and_of_its_joiners_gets_compression_project_gradients() -> None:
    from node0sim.app import compose_run_config
    from node0sim.experiment import model_config, stage_computes, vocabulary_size
    from node0sim.sim.runner import VirtualSwarm, build_simulation

    for setting in (True, False):
        run = compose_run_config(
            "experiment=minimal", "compression=subspace", "compression.rate=4", f"compression.project_gradients={setting}")
        templates = stage_computes(run, model_config(run, vocabulary_size(run)))
        swarm = VirtualSwarm(run, build_simulation(run), templates, log=lambda record: None)
        joiners = [swarm._compute_for(stage) for stage in range(run.topology.num_stages)]  # what a joining peer serves
        assert [c.project_gradients for c in templates + joiners] == [setting] * 2 * run.topology.num_stages
