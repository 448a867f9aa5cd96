"""Wire codecs for what crosses a pipeline-stage boundary: activations forward, their gradients backward.

Each codec turns a [B, T, dim] tensor into a wire payload (a tensor or a :class:`Packed`) and back,
and can describe that payload with :class:`TensorSpec` s only (timing mode), so the byte count is
the same either way. Bytes per token per boundary per direction, with ``a`` the activation dtype's
size (4 for float32, 2 for bfloat16):

=====================  ==================================  ==========================================
codec                  bytes per token                     notes
=====================  ==================================  ==========================================
``none``               ``dim * a``                         exact
``subspace``           ``k * a`` (+ 4 for the int32 id)    exact if the model is subspace-constrained;
                                                           the token ids travel beside the payload
                                                           (forward only; they are not part of it)
``random_projection``  ``k * a``                           lossy: ``x U U^T``, no weight constraint
``topk``               ``keep * (a + 2)``                  lossy: values + int16 indices
``quantize``           ``dim * bits / 8 + 4``              lossy: int8 or packed int4, fp32 scale
=====================  ==================================  ==========================================

:func:`make_codec` sizes the lossy baselines at the byte budget of a compression ``rate``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from node0sim.model.subspace import SubspaceBasis
from node0sim.protocol.messages import Packed, Payload, TensorSpec

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "DenseCodec",
    "SubspaceCodec",
    "RandomProjectionCodec",
    "TopKCodec",
    "QuantizeCodec",
    "rank_for",
    "topk_keep_for",
    "make_codec",
]

CODEC_NAMES = ("none", "subspace", "random_projection", "topk", "quantize")

MAX_INT16_INDEX = torch.iinfo(torch.int16).max


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(wire: object) -> str:
    if isinstance(wire, torch.Tensor):
        return f"{tuple(wire.shape)} {_dtype_name(wire.dtype)}"
    return type(wire).__name__


def _check_input(codec: str, what: str, x: torch.Tensor, dim: int | None = None) -> None:
    """Check a tensor about to be encoded is [B, T, dim] floating point."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point() or (
        dim is not None and x.shape[2] != dim
    ):
        width = "dim" if dim is None else str(dim)
        raise ValueError(f"{codec} codec can only encode {what} of shape [B, T, {width}] floating point, got {_describe(x)}")


def _check_float_part(
    codec: str, what: str, part: object, width: int | None, leading: tuple[int, int] | None = None
) -> torch.Tensor:
    """Check a floating wire tensor is [B, T, width] (``leading`` fixes B, T; None leaves a size free) and finite."""
    ok = isinstance(part, torch.Tensor) and part.dim() == 3 and part.is_floating_point()
    if ok and width is not None:
        ok = part.shape[2] == width
    if ok and leading is not None:
        ok = tuple(part.shape[:2]) == leading
    if not ok:
        dims = "B, T" if leading is None else f"{leading[0]}, {leading[1]}"
        raise ValueError(
            f"{codec} codec expected {what} of shape [{dims}, {'dim' if width is None else width}] "
            f"floating point, got {_describe(part)}"
        )
    if not bool(torch.isfinite(part).all()):
        raise ValueError(f"{codec} codec got non-finite (NaN/inf) values in {what}")
    return part


def _check_spec(dtype: torch.dtype, batch: int, seq_len: int, dim: int) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"activation dtype must be floating point, got {dtype}")
    if batch < 1 or seq_len < 1 or dim < 1:
        raise ValueError(f"batch, seq_len and dim must be >= 1, got {batch}, {seq_len}, {dim}")


class Codec(ABC):
    """Encodes boundary activations and activation gradients for the wire, and decodes them."""

    name: str
    needs_token_ids: bool = False
    """Whether :meth:`encode`/:meth:`decode` need the micro-batch's token ids (sent beside the payload)."""

    @abstractmethod
    def encode(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Payload:
        """Activations [B, T, dim] -> wire payload."""

    @abstractmethod
    def decode(self, wire: Payload, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Wire payload -> activations [B, T, dim]; raises ValueError for a malformed payload."""

    @abstractmethod
    def encode_grad(self, g: torch.Tensor) -> Payload:
        """Gradient w.r.t. boundary activations [B, T, dim] -> wire payload (sent upstream)."""

    @abstractmethod
    def decode_grad(self, wire: Payload) -> torch.Tensor:
        """Wire payload -> gradient [B, T, dim]; raises ValueError for a malformed payload."""

    @abstractmethod
    def activation_spec(self, batch: int, seq_len: int, dim: int, dtype: torch.dtype) -> Payload:
        """The forward payload's layout as specs (no tensors), byte-for-byte what :meth:`encode` sends."""

    def grad_spec(self, batch: int, seq_len: int, dim: int, dtype: torch.dtype) -> Payload:
        """The backward payload's layout as specs; every codec here compresses gradients like activations."""
        return self.activation_spec(batch, seq_len, dim, dtype)

    def check_wire(self, wire: Payload) -> None:
        """Refuse (ValueError) what decoding would refuse of a payload that has :meth:`activation_spec`'s layout and
        finite floating values: nothing here (top-k: indices out of range)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DenseCodec(Codec):
    """No compression: the wire carries the tensor itself."""

    name = "none"

    def encode(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Payload:
        _check_input(self.name, "activations", x)
        return x

    def decode(self, wire: Payload, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return _check_float_part(self.name, "activations", wire, None)

    def encode_grad(self, g: torch.Tensor) -> Payload:
        _check_input(self.name, "gradients", g)
        return g

    def decode_grad(self, wire: Payload) -> torch.Tensor:
        return _check_float_part(self.name, "gradients", wire, None)

    def activation_spec(self, batch: int, seq_len: int, dim: int, dtype: torch.dtype) -> Payload:
        _check_spec(dtype, batch, seq_len, dim)
        return TensorSpec((batch, seq_len, dim), dtype)


class _ProjectionCodec(Codec):
    """Sends ``(x - offset) U`` ([B, T, k]) and rebuilds ``c U^T + offset``; gradients ``g U`` and ``c U^T``.

    ``basis`` may be None for a timing-only instance, which can describe payloads but not encode.
    """

    subtract_fixed: bool

    def __init__(self, rank: int, basis: SubspaceBasis | None) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{self.name} codec rank must be a positive int, got {rank!r}")
        if basis is not None and basis.rank != rank:
            raise ValueError(f"{self.name} codec rank {rank} does not match the basis's rank {basis.rank}")
        self.rank = rank
        self.basis = basis

    def __repr__(self) -> str:
        fingerprint = None if self.basis is None else self.basis.fingerprint()
        return f"{type(self).__name__}(rank={self.rank}, basis={fingerprint})"

    def _require_basis(self) -> SubspaceBasis:
        if self.basis is None:
            raise RuntimeError(
                f"{self.name} codec was built without a basis (timing only): it can describe payloads "
                "but not encode or decode tensors; pass a SubspaceBasis"
            )
        return self.basis

    def _offset(self, token_ids: torch.Tensor | None, leading: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        """``T[token_ids]`` for the subspace codec, None for random projection."""
        if not self.subtract_fixed:
            return None
        basis = self._require_basis()
        if token_ids is None:
            raise ValueError(f"{self.name} codec needs the micro-batch's token ids, got None")
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
            raise ValueError(f"{self.name} codec expected integer token ids, got {_describe(token_ids)}")
        if tuple(token_ids.shape) != leading:
            raise ValueError(f"{self.name} codec expected token ids of shape {leading}, got {tuple(token_ids.shape)}")
        lo, hi = torch.aminmax(token_ids)
        if lo.item() < 0 or hi.item() >= basis.vocab_size:
            raise ValueError(
                f"{self.name} codec got token ids out of range [0, {basis.vocab_size}): min {lo.item()}, max {hi.item()}"
            )
        return basis.fixed_embedding.to(device)[token_ids.long()]

    def _compress(self, x: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        u = self._require_basis().basis.to(x.device)
        residual = x.float() if offset is None else x.float() - offset
        return (residual @ u).to(x.dtype)

    def _expand(self, c: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        u = self._require_basis().basis.to(c.device)
        full = c.float() @ u.T
        return (full if offset is None else full + offset).to(c.dtype)

    def _check_wire(self, what: str, wire: Payload) -> torch.Tensor:
        return _check_float_part(self.name, f"compressed {what}", wire, self.rank)

    def encode(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Payload:
        basis = self._require_basis()
        _check_input(self.name, "activations", x, basis.dim)
        return self._compress(x, self._offset(token_ids, tuple(x.shape[:2]), x.device))

    def decode(self, wire: Payload, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        self._require_basis()
        c = self._check_wire("activations", wire)
        return self._expand(c, self._offset(token_ids, tuple(c.shape[:2]), c.device))

    def encode_grad(self, g: torch.Tensor) -> Payload:
        _check_input(self.name, "gradients", g, self._require_basis().dim)
        return self._compress(g, None)

    def decode_grad(self, wire: Payload) -> torch.Tensor:
        self._require_basis()
        return self._expand(self._check_wire("gradients", wire), None)

    def activation_spec(self, batch: int, seq_len: int, dim: int, dtype: torch.dtype) -> Payload:
        _check_spec(dtype, batch, seq_len, dim)
        if self.rank > dim or (self.basis is not None and self.basis.dim != dim):
            raise ValueError(f"{self.name} codec of rank {self.rank} cannot describe activations of dim {dim}")
        return TensorSpec((batch, seq_len, self.rank), dtype)


class SubspaceCodec(_ProjectionCodec):
    """Protocol Models' exact codec: sends ``C = (X - T[ids]) U`` and rebuilds ``X = C U^T + T[ids]``.

    Exact when ``X - T[ids]`` lies in span(U), i.e. when the model is built with the basis's fixed
    embedding and kept projected (:func:`node0sim.model.subspace.project_onto_subspace_`). The
    gradient travels as ``dL/dX U`` and comes back as ``U U^T dL/dX``: upstream parameters only
    move X inside span(U), so that is all of dL/dX they can use.
    """

    name = "subspace"
    needs_token_ids = True
    subtract_fixed = True


class RandomProjectionCodec(_ProjectionCodec):
    """Lossy low-rank baseline: sends ``x U`` and rebuilds ``x U U^T`` (no constraint, no fixed-embedding subtraction)."""

    name = "random_projection"
    subtract_fixed = False


class _TokenwiseCodec(Codec):
    """A codec that treats activations and gradients alike, with no token ids: subclasses give
    ``_encode(what, x)`` and ``_decode(what, wire)``, ``what`` naming the payload in errors."""

    @abstractmethod
    def _encode(self, what: str, x: torch.Tensor) -> Packed:
        """Compress ``x``."""

    @abstractmethod
    def _decode(self, what: str, wire: Payload) -> torch.Tensor:
        """Validate and decompress ``wire``."""

    def encode(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Payload:
        return self._encode("activations", x)

    def decode(self, wire: Payload, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._decode("activations", wire)

    def encode_grad(self, g: torch.Tensor) -> Payload:
        return self._encode("gradients", g)

    def decode_grad(self, wire: Payload) -> torch.Tensor:
        return self._decode("gradients", wire)


class TopKCodec(_TokenwiseCodec):
    """Lossy sparsification: per token, the ``keep`` largest-magnitude entries as values + int16 indices."""

    name = "topk"

    def __init__(self, keep: int) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= MAX_INT16_INDEX:
            raise ValueError(f"topk codec keep must be an int in [1, {MAX_INT16_INDEX}], got {keep!r}")
        self.keep = keep

    def __repr__(self) -> str:
        return f"TopKCodec(keep={self.keep})"

    def _check_dim(self, dim: int) -> None:
        if not self.keep <= dim <= MAX_INT16_INDEX + 1:
            raise ValueError(
                f"topk codec keeping {self.keep} needs keep <= dim <= {MAX_INT16_INDEX + 1} "
                f"(int16 indices), got dim {dim}"
            )

    def _encode(self, what: str, x: torch.Tensor) -> Packed:
        _check_input(self.name, what, x)
        self._check_dim(x.shape[2])
        indices = x.abs().topk(self.keep, dim=-1).indices
        values = x.gather(-1, indices)
        return Packed({"values": values, "indices": indices.to(torch.int16)}, shape=tuple(x.shape))

    def _decode(self, what: str, wire: Payload) -> torch.Tensor:
        if not isinstance(wire, Packed) or set(wire.parts) != {"values", "indices"} or len(wire.shape) != 3:
            raise ValueError(
                f"topk codec expected a Packed {what} payload with parts 'values' and 'indices' and a "
                f"[B, T, dim] shape, got {_describe(wire) if not isinstance(wire, Packed) else sorted(wire.parts)}"
            )
        batch, seq_len, dim = wire.shape
        self._check_dim(dim)
        values = _check_float_part(self.name, f"{what} values", wire.parts["values"], self.keep, (batch, seq_len))
        indices = wire.parts["indices"]
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int16 or indices.shape != values.shape:
            raise ValueError(
                f"topk codec expected {what} indices of shape {(batch, seq_len, self.keep)} int16, got {_describe(indices)}"
            )
        self._check_indices(what, indices, dim)
        return values.new_zeros((batch, seq_len, dim)).scatter_(-1, indices.long(), values)

    @staticmethod
    def _check_indices(what: str, indices: torch.Tensor, dim: int) -> None:
        lo, hi = torch.aminmax(indices)
        if lo.item() < 0 or hi.item() >= dim:
            raise ValueError(f"topk codec got {what} indices out of range [0, {dim}): min {lo.item()}, max {hi.item()}")

    def check_wire(self, wire: Payload) -> None:
        indices = wire.parts["indices"]
        if isinstance(indices, torch.Tensor):  # a spec (timing mode) has no values
            self._check_indices("payload", indices, wire.shape[-1])

    def activation_spec(self, batch: int, seq_len: int, dim: int, dtype: torch.dtype) -> Payload:
        _check_spec(dtype, batch, seq_len, dim)
        self._check_dim(dim)
        parts = {
            "values": TensorSpec((batch, seq_len, self.keep), dtype),
            "indices": TensorSpec((batch, seq_len, self.keep), torch.int16),
        }
        return Packed(parts, shape=(batch, seq_len, dim))


class QuantizeCodec(_TokenwiseCodec):
    """Lossy per-token absmax symmetric quantization to int8, or int4 packed two per byte, with a float32 scale per token.

    Decoded tensors are float32 (the scales' dtype).
    """

    name = "quantize"

    def __init__(self, bits: int) -> None:
        if bits not in (8, 4) or isinstance(bits, bool):
            raise ValueError(f"quantize codec bits must be 8 or 4, got {bits!r}")
        self.bits = bits
        self.qmax = 2 ** (bits - 1) - 1  # symmetric range [-qmax, qmax]: 127 or 7

    def __repr__(self) -> str:
        return f"QuantizeCodec(bits={self.bits})"

    def _check_dim(self, dim: int) -> None:
        if self.bits == 4 and dim % 2:
            raise ValueError(f"quantize codec with 4 bits packs two values per byte and needs an even dim, got {dim}")

    def _values_spec(self, batch: int, seq_len: int, dim: int) -> TensorSpec:
        if self.bits == 8:
            return TensorSpec((batch, seq_len, dim), torch.int8)
        return TensorSpec((batch, seq_len, dim // 2), torch.uint8)

    def _encode(self, what: str, x: torch.Tensor) -> Packed:
        _check_input(self.name, what, x)
        self._check_dim(x.shape[2])
        x = x.float()
        absmax = x.abs().amax(dim=-1, keepdim=True)
        scales = torch.where(absmax > 0, absmax / self.qmax, torch.ones_like(absmax))
        q = torch.round(x / scales).clamp_(-self.qmax, self.qmax).to(torch.int8)
        if self.bits == 4:
            nibbles = (q + 8).to(torch.uint8)  # [-7, 7] -> [1, 15]
            q = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
        return Packed({"values": q, "scales": scales}, shape=tuple(x.shape))

    def _decode(self, what: str, wire: Payload) -> torch.Tensor:
        if not isinstance(wire, Packed) or set(wire.parts) != {"values", "scales"} or len(wire.shape) != 3:
            raise ValueError(
                f"quantize codec expected a Packed {what} payload with parts 'values' and 'scales' and a "
                f"[B, T, dim] shape, got {_describe(wire) if not isinstance(wire, Packed) else sorted(wire.parts)}"
            )
        batch, seq_len, dim = wire.shape
        self._check_dim(dim)
        spec = self._values_spec(batch, seq_len, dim)
        q = wire.parts["values"]
        if not isinstance(q, torch.Tensor) or tuple(q.shape) != spec.shape or q.dtype != spec.dtype:
            raise ValueError(
                f"quantize codec ({self.bits} bits) expected {what} values of shape {spec.shape} "
                f"{_dtype_name(spec.dtype)}, got {_describe(q)}"
            )
        scales = wire.parts["scales"]
        if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (batch, seq_len, 1) or scales.dtype != torch.float32:
            raise ValueError(
                f"quantize codec expected {what} scales of shape {(batch, seq_len, 1)} float32, got {_describe(scales)}"
            )
        if not bool(torch.isfinite(scales).all()):
            raise ValueError(f"quantize codec got non-finite (NaN/inf) {what} scales")
        if self.bits == 4:
            q = torch.stack(((q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8), dim=-1).flatten(-2)
        return q.float() * scales

    def activation_spec(self, batch: int, seq_len: int, dim: int, dtype: torch.dtype) -> Payload:
        _check_spec(dtype, batch, seq_len, dim)
        self._check_dim(dim)
        parts = {"values": self._values_spec(batch, seq_len, dim), "scales": TensorSpec((batch, seq_len, 1), torch.float32)}
        return Packed(parts, shape=(batch, seq_len, dim))


def rank_for(dim: int, rate: float) -> int:
    """Subspace / random-projection rank at compression ``rate``: ``max(1, floor(dim / rate))`` (Node0: 4096 // 100 = 40)."""
    return max(1, math.floor(dim / rate))


def topk_keep_for(dim: int, rate: float, activation_bytes: int = 4) -> int:
    """Top-k entries per token whose values + int16 indices take about ``1/rate`` of the dense bytes."""
    return max(1, math.floor(dim * activation_bytes / rate / (activation_bytes + 2)))


def max_rate(name: str, dim: int, activation_bytes: int = 4) -> float:
    """The largest compression ``rate`` codec ``name`` can reach on activations of width ``dim`` (inf where the rate is
    ignored): rank 1 (subspace, random_projection) or one kept entry per token (topk); a higher rate would be clamped
    to this one."""
    if name in ("subspace", "random_projection"):
        return float(dim)
    if name == "topk":
        return dim * activation_bytes / (activation_bytes + 2)
    return math.inf


def make_codec(
    name: str, dim: int, rate: float, bits: int = 8, basis: SubspaceBasis | None = None, activation_bytes: int = 4
) -> Codec:
    """The codec ``name`` sized for compression ``rate`` on activations of width ``dim``.

    ``subspace``/``random_projection`` use rank :func:`rank_for` (``basis``, if given, must have that
    rank; without one the codec is timing-only); ``topk`` keeps :func:`topk_keep_for` entries with
    ``activation_bytes``-byte values; ``quantize`` ignores ``rate`` (its ratio is set by ``bits``).
    """
    if name not in CODEC_NAMES:
        raise ValueError(f"unknown codec {name!r}; allowed: {list(CODEC_NAMES)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 1:
        raise ValueError(f"compression rate must be a finite number >= 1, got {rate!r}")
    if basis is not None and basis.dim != dim:
        raise ValueError(f"subspace basis has dim {basis.dim}, the model has dim {dim}")
    if name == "none":
        return DenseCodec()
    if name == "subspace":
        return SubspaceCodec(rank_for(dim, rate), basis)
    if name == "random_projection":
        return RandomProjectionCodec(rank_for(dim, rate), basis)
    if name == "topk":
        return TopKCodec(topk_keep_for(dim, rate, activation_bytes))
    return QuantizeCodec(bits)
