"""Protocol Models' subspace constraint: a shared basis U and frozen embedding T, and the weight projection.

Ramasinghe et al. 2025, "Protocol Models / Subspace Networks" (arXiv 2506.01260), as deployed by
Node0 (``ss_regularize``, ``compress_output``/``decompress_input``). Every stage shares an
orthonormal ``U`` (dim x k) and a frozen random token table ``T`` (vocab x dim). If every output
projection whose output crosses a stage boundary (attention ``wo``, MLP ``w2``) and the trainable
token embedding are kept in span(U), the residual stream satisfies ``X - T[ids] in span(U)``
exactly, so a boundary only needs to send ``(X - T[ids]) U`` (k numbers per token) plus the ids.
Layers on the tail stage stay full rank: their outputs never cross a boundary.

The invariant needs gain-free norms wherever a norm follows an output projection
(``norm_reorder``): an RMSNorm without gain scales each token by a scalar, which stays in span(U),
while a per-channel gain does not.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from node0sim.model.llama import PipelineStage

__all__ = [
    "SubspaceBasis",
    "make_basis",
    "save_basis",
    "load_basis",
    "load_basis_from_hub",
    "ConstrainedWeight",
    "constrained_weights",
    "project_onto_subspace_",
    "subspace_residual",
]

ORTHONORMAL_TOL = 1e-4
"""Largest ``|U^T U - I|`` entry accepted from a basis file."""


@dataclass(frozen=True, eq=False)
class SubspaceBasis:
    """The basis ``U`` (dim x k, orthonormal columns) and fixed embedding ``T`` (vocab x dim) every stage shares."""

    basis: torch.Tensor
    fixed_embedding: torch.Tensor
    seed: int

    def __post_init__(self) -> None:
        for name in ("basis", "fixed_embedding"):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.dtype != torch.float32:
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ValueError(f"SubspaceBasis.{name} must be a 2-D float32 tensor, got {got}")
        dim, rank = self.basis.shape
        if not 1 <= rank <= dim:
            raise ValueError(f"SubspaceBasis.basis must be (dim, rank) with 1 <= rank <= dim, got {(dim, rank)}")
        if self.fixed_embedding.shape[1] != dim:
            raise ValueError(
                f"SubspaceBasis.fixed_embedding must be (vocab_size, {dim}) to match the basis, "
                f"got {tuple(self.fixed_embedding.shape)}"
            )

    @property
    def dim(self) -> int:
        """Model width d."""
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        """Subspace dimension k."""
        return self.basis.shape[1]

    @property
    def vocab_size(self) -> int:
        """Rows of the fixed embedding."""
        return self.fixed_embedding.shape[0]

    def fingerprint(self) -> str:
        """Short sha256 of both tensors (shapes and bytes), for peers to check they share the same basis."""
        digest = hashlib.sha256()
        for tensor in (self.basis, self.fixed_embedding):
            digest.update(repr(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def make_basis(dim: int, rank: int, vocab_size: int, seed: int, fixed_std: float = 1.0) -> SubspaceBasis:
    """Generate ``U`` and ``T`` from ``seed`` with a local generator (the global RNG is untouched).

    ``U`` is the Q factor of a Gaussian dim x rank matrix, with column signs chosen so that R has a
    positive diagonal (which makes the factorization unique); ``T ~ N(0, fixed_std^2)`` (Node0: std 1).
    The Gaussian draws are reproducible everywhere; the QR goes through LAPACK, whose last bits may
    differ between builds, so peers on different machines should share a saved file
    (:func:`save_basis`) and compare :meth:`SubspaceBasis.fingerprint`.
    """
    if not 1 <= rank <= dim:
        raise ValueError(f"subspace rank must satisfy 1 <= rank <= dim={dim}, got {rank}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not fixed_std > 0:
        raise ValueError(f"fixed_std must be > 0, got {fixed_std}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(dim, rank, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    basis = (q * signs).float()
    fixed = torch.randn(vocab_size, dim, generator=gen, dtype=torch.float32) * fixed_std
    return SubspaceBasis(basis=basis, fixed_embedding=fixed, seed=seed)


def save_basis(basis: SubspaceBasis, path: str | os.PathLike[str]) -> None:
    """Write ``basis`` with its metadata (dim, rank, vocab_size, seed, fingerprint) via ``torch.save``."""
    torch.save(
        {
            "basis": basis.basis,
            "fixed_embedding": basis.fixed_embedding,
            "dim": basis.dim,
            "rank": basis.rank,
            "vocab_size": basis.vocab_size,
            "seed": basis.seed,
            "fingerprint": basis.fingerprint(),
        },
        path,
    )


_KEYS = ("basis", "fixed_embedding", "dim", "rank", "vocab_size", "seed", "fingerprint")


def load_basis(path: str | os.PathLike[str], dim: int, rank: int, vocab_size: int) -> SubspaceBasis:
    """Load a :func:`save_basis` file and check it fits the run (dim, rank, vocab), is intact and orthonormal.

    Raises ValueError naming the file and the problem; a missing file raises FileNotFoundError.
    """
    where = f"subspace basis file {os.fspath(path)!r}"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises several types for unreadable or non-torch files
        raise ValueError(f"{where} could not be read as a torch file: {error}") from error
    if not isinstance(data, dict) or any(key not in data for key in _KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{where} is not a saved subspace basis: expected keys {list(_KEYS)}, found {found}")
    expected = {"dim": dim, "rank": rank, "vocab_size": vocab_size}
    mismatched = [f"{key} {data[key]} (run expects {value})" for key, value in expected.items() if data[key] != value]
    if mismatched:
        raise ValueError(f"{where} does not fit this run: it has {', '.join(mismatched)}")
    try:
        loaded = SubspaceBasis(basis=data["basis"], fixed_embedding=data["fixed_embedding"], seed=int(data["seed"]))
    except ValueError as error:
        raise ValueError(f"{where} is malformed: {error}") from error
    if (loaded.dim, loaded.rank, loaded.vocab_size) != (dim, rank, vocab_size):
        raise ValueError(
            f"{where} is malformed: tensors have dim {loaded.dim}, rank {loaded.rank}, vocab_size "
            f"{loaded.vocab_size} but its metadata says {dim}, {rank}, {vocab_size}"
        )
    actual = loaded.fingerprint()
    if actual != data["fingerprint"]:
        raise ValueError(
            f"{where} is corrupt: its tensors hash to fingerprint {actual}, the file records {data['fingerprint']}"
        )
    gram_error = (loaded.basis.T @ loaded.basis - torch.eye(rank)).abs().max()
    if not bool(torch.isfinite(gram_error)) or gram_error.item() > ORTHONORMAL_TOL:
        raise ValueError(f"{where} has a basis that is not orthonormal: max |U^T U - I| = {gram_error.item():.3g}")
    if not bool(torch.isfinite(loaded.fixed_embedding).all()):
        raise ValueError(f"{where} has non-finite (NaN/inf) values in its fixed embedding")
    return loaded


def load_basis_from_hub(
    repo_id: str, filename: str, dim: int, rank: int, vocab_size: int, *, cache_dir: str | os.PathLike[str] | None = None
) -> SubspaceBasis:
    """Fetch ``filename`` from Hugging Face Hub repo ``repo_id`` (or its local cache, offline) and :func:`load_basis` it.

    A failed download raises RuntimeError saying what was tried.
    """
    from huggingface_hub import hf_hub_download  # imported here: only this loader needs it

    try:
        local_path = hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir)
    except Exception as error:  # the hub client raises HTTP, connection, offline-cache and validation errors
        raise RuntimeError(
            f"could not get subspace basis {filename!r} from Hugging Face Hub repo {repo_id!r} "
            f"(download, or the local cache when offline): {type(error).__name__}: {error}. "
            "Pass a local basis file instead, or generate the basis from a seed (make_basis)."
        ) from error
    return load_basis(local_path, dim, rank, vocab_size)


class ConstrainedWeight(NamedTuple):
    """A parameter kept in span(U); ``model_axis`` is the axis of length dim that is projected."""

    name: str
    param: nn.Parameter
    model_axis: int


def constrained_weights(stage: PipelineStage) -> list[ConstrainedWeight]:
    """The parameters of ``stage`` whose output reaches a stage boundary and so must stay in span(U).

    Non-tail stages: every layer's attention ``wo`` and MLP ``w2`` (Linear weights [dim, in],
    model axis 0) and, on the head, the trainable token embedding ([vocab, dim], model axis 1).
    The tail stage sends no activations, so nothing on it is constrained.
    """
    if stage.is_tail:
        return []
    weights = []
    if stage.is_head:
        weights.append(ConstrainedWeight("tok_embeddings.weight", stage.tok_embeddings.weight, 1))
    for index, layer in stage.layers.items():
        weights.append(ConstrainedWeight(f"layers.{index}.attention.wo.weight", layer.attention.wo.weight, 0))
        weights.append(ConstrainedWeight(f"layers.{index}.feed_forward.w2.weight", layer.feed_forward.w2.weight, 0))
    return weights


@torch.no_grad()
def project_onto_subspace_(stage: PipelineStage, basis: SubspaceBasis) -> None:
    """Project ``stage``'s constrained weights onto span(U) in place (Node0's ``ss_regularize``).

    Linear weights become ``U (U^T W)`` and the embedding ``(E U) U^T``. On a non-tail head the
    stage's fixed embedding must be ``basis.fixed_embedding``, or reconstruction would be wrong.
    """
    if basis.dim != stage.cfg.dim:
        raise ValueError(f"subspace basis has dim {basis.dim}, stage {stage.index} has dim {stage.cfg.dim}")
    weights = constrained_weights(stage)
    if stage.is_head and weights:
        fixed = stage.fixed_embedding
        if fixed is None or fixed.shape != basis.fixed_embedding.shape or not torch.equal(
            fixed.float().cpu(), basis.fixed_embedding
        ):
            raise ValueError(
                "head stage's fixed_embedding is missing or differs from the subspace basis's; build the "
                "stages with build_stages(..., fixed_embedding=basis.fixed_embedding)"
            )
    for weight in weights:
        weight.param.copy_(_project(weight.param, weight.model_axis, basis))


@torch.no_grad()
def project_gradients_onto_subspace_(stage: PipelineStage, basis: SubspaceBasis) -> None:
    """Project the gradients of ``stage``'s constrained weights onto span(U) in place.

    Projected gradient descent: the optimizer then sees the same gradients whether or not the
    boundary activations went through the subspace codec (which already drops the part of
    dL/dX outside span(U)), so training with and without the wire codec is identical.
    """
    for weight in constrained_weights(stage):
        if weight.param.grad is not None:
            weight.param.grad.copy_(_project(weight.param.grad, weight.model_axis, basis))


def _project(tensor: torch.Tensor, model_axis: int, basis: SubspaceBasis) -> torch.Tensor:
    u = basis.basis.to(tensor.device)
    t = tensor.float()
    return u @ (u.T @ t) if model_axis == 0 else (t @ u) @ u.T


@torch.no_grad()
def subspace_residual(x: torch.Tensor, token_ids: torch.Tensor, basis: SubspaceBasis) -> float:
    """Max ``|R - R U U^T|`` with ``R = x - T[ids]``: how far boundary activations ``x`` [B, T, dim] are from exact reconstruction."""
    u = basis.basis.to(x.device)
    residual = x.float() - basis.fixed_embedding.to(x.device)[token_ids.long()]
    return (residual - (residual @ u) @ u.T).abs().max().item()
