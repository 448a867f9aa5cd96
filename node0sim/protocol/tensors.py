"""Tensor code that runs unchanged in both modes: real tensors (numerics) or :class:`TensorSpec` (timing).

Timing mode sends the messages numerics mode sends, without their values: a :class:`TensorSpec`
is a shape and a dtype that supports the tensor operations the protocol performs (slicing along
dim 0, ``reshape``/``view``, ``.T``, ``@``, arithmetic with scalars and same-shape operands,
``split``), each giving the spec of its result. What torch spells as a function is one of the
helpers below. Protocol code written with these alone (no ``isinstance`` on the mode) computes
the same shapes, so it puts the same bytes on the wire, in either mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that timing mode does not materialize (immutable, so cheap to share)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @cached_property  # a message's size is asked for several times on its way (spec is immutable)
    def nbytes(self) -> int:
        """Bytes the tensor would occupy."""
        return math.prod(self.shape) * self.dtype.itemsize

    def numel(self) -> int:
        """Number of values."""
        return math.prod(self.shape)

    def element_size(self) -> int:
        """Bytes per value."""
        return self.dtype.itemsize

    def dim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def clone(self) -> TensorSpec:
        """A spec has no values to copy: itself."""
        return self

    def to(self, dtype: torch.dtype) -> TensorSpec:
        """The same shape as ``dtype``."""
        return TensorSpec(self.shape, dtype)

    def reshape(self, *shape: int) -> TensorSpec:
        """The same values in ``shape`` (one entry may be -1), as ``Tensor.reshape``."""
        dims = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        count = math.prod(self.shape)
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            dims = tuple(count // known if d == -1 and known else d for d in dims)
        if math.prod(dims) != count:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return TensorSpec(dims, self.dtype)

    view = reshape

    @property
    def T(self) -> TensorSpec:  # noqa: N802 (torch's name)
        """The transpose of a matrix."""
        if len(self.shape) != 2:
            raise ValueError(f".T needs a matrix, got shape {self.shape}")
        return TensorSpec(self.shape[::-1], self.dtype)

    def __matmul__(self, other: TensorSpec) -> TensorSpec:
        if len(self.shape) != 2 or len(other.shape) != 2 or self.shape[1] != other.shape[0]:
            raise ValueError(f"cannot multiply matrices of shapes {self.shape} and {tuple(other.shape)}")
        return TensorSpec((self.shape[0], other.shape[1]), self.dtype)

    def __getitem__(self, index: slice) -> TensorSpec:
        """A slice along dim 0."""
        if not isinstance(index, slice):
            raise TypeError(f"a TensorSpec supports only slices along dim 0, got {index!r}")
        return TensorSpec((len(range(*index.indices(self.shape[0]))), *self.shape[1:]), self.dtype)

    def split(self, split_sizes: list[int]) -> list[TensorSpec]:
        """Consecutive pieces of ``split_sizes`` rows each, as ``Tensor.split`` with a list."""
        if sum(split_sizes) != self.shape[0]:
            raise ValueError(f"split sizes {split_sizes} do not add up to {self.shape[0]} rows")
        rest = self.shape[1:]
        return [TensorSpec((size, *rest), self.dtype) for size in split_sizes]

    def _elementwise(self, other: Any) -> TensorSpec:
        """The spec of ``self <op> other`` for a scalar or a same-shape spec (``x += y`` rebinds ``x`` to it)."""
        if isinstance(other, (int, float)) or (isinstance(other, TensorSpec) and other.shape == self.shape):
            return self
        raise ValueError(f"cannot combine a spec of shape {self.shape} with {describe(other)}")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _elementwise


Tensor = torch.Tensor | TensorSpec
"""A tensor of either mode."""


def describe(value: Any) -> str:
    """Shape and dtype of a tensor or spec, for error messages (the type name otherwise)."""
    if isinstance(value, (torch.Tensor, TensorSpec)):
        return f"{tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor of either mode (what a message field must hold to be computed on)."""
    return isinstance(value, (torch.Tensor, TensorSpec))


def same_layout(value: Any, like: Tensor) -> bool:
    """Whether ``value`` is a tensor of ``like``'s mode, shape and dtype (so ``like + value`` is well-formed)."""
    return type(value) is type(like) and value.dtype == like.dtype and tuple(value.shape) == tuple(like.shape)


def cat(parts: list[Tensor]) -> Tensor:
    """``torch.cat`` along dim 0 (parts all of one mode)."""
    if isinstance(parts[0], TensorSpec):
        first = parts[0]
        return TensorSpec((sum(part.shape[0] for part in parts), *first.shape[1:]), first.dtype)
    return torch.cat(parts)


def zeros_like(value: Tensor) -> Tensor:
    """``torch.zeros_like``."""
    return value if isinstance(value, TensorSpec) else torch.zeros_like(value)


def full_like(value: Tensor, fill: float) -> Tensor:
    """``torch.full_like``."""
    return value if isinstance(value, TensorSpec) else torch.full_like(value, fill)


def mean_value(value: Tensor) -> float | None:
    """The mean of the values (None for a spec, which has none)."""
    return None if isinstance(value, TensorSpec) else value.mean().item()


def randn_like(like: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Standard-normal values of ``shape`` in ``like``'s mode and dtype (a spec draws nothing from ``generator``)."""
    if isinstance(like, TensorSpec):
        return TensorSpec(shape, like.dtype)
    return torch.randn(shape, generator=generator, dtype=like.dtype)


def all_finite(value: Tensor) -> bool:
    """Whether every value is finite (a spec has none that is not)."""
    return isinstance(value, TensorSpec) or bool(torch.isfinite(value).all())


def orthonormalize(matrix: Tensor) -> Tensor:
    """An orthonormal basis of the columns of a tall matrix (the Q of its reduced QR decomposition)."""
    return matrix if isinstance(matrix, TensorSpec) else torch.linalg.qr(matrix).Q
