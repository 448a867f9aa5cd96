"""Messages between trainers and stage servers, and how many bytes each one puts on the wire.

A payload is either a real tensor (numerics mode) or a :class:`TensorSpec` (timing mode: the
same shape and dtype, no data). Either way the network is charged the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

HEADER_BYTES = 64
"""Per-message framing: method, stage index, tensor shapes and dtypes."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that timing mode does not materialize."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @cached_property  # a message's size is asked for several times on its way (spec is immutable)
    def nbytes(self) -> int:
        """Bytes the tensor would occupy."""
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def _tensor_bytes(part: "torch.Tensor | TensorSpec") -> int:
    return part.numel() * part.element_size() if isinstance(part, torch.Tensor) else part.nbytes


@dataclass(frozen=True)
class Packed:
    """A compressed payload: several tensors (or, in timing mode, specs) that travel together.

    ``shape`` is the logical shape of what was compressed (e.g. [B, T, dim]); the wire size is
    the sum of the parts, so indices, scales and packed nibbles are all charged.
    """

    parts: dict[str, "torch.Tensor | TensorSpec"]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of all parts."""
        return sum(_tensor_bytes(part) for part in self.parts.values())


Payload = torch.Tensor | TensorSpec | Packed


def payload_bytes(*payloads: Payload | None) -> int:
    """Wire size of ``payloads`` (``None`` entries are absent fields)."""
    total = 0
    for payload in payloads:
        if isinstance(payload, Packed):
            total += payload.nbytes
        elif payload is not None:
            total += _tensor_bytes(payload)
    return total


def leading_dims(payload: Payload) -> tuple[int, int]:
    """``(batch, seq_len)`` of a token or activation payload."""
    shape = payload.shape if isinstance(payload, (Packed, TensorSpec)) else tuple(payload.shape)
    return shape[0], shape[1]


@dataclass(frozen=True)
class ForwardRequest:
    """Run stage ``stage`` forward on ``inputs`` (token ids for the head, boundary activations otherwise).

    ``token_ids`` travel with the activations when the boundary codec needs them (subspace compression).
    """

    stage: int
    inputs: Payload
    token_ids: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.inputs, self.token_ids)


@dataclass(frozen=True)
class ForwardResponse:
    """The stage's output activations."""

    outputs: Payload

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.outputs)


@dataclass(frozen=True)
class BackwardRequest:
    """Backward through stage ``stage``: the forward input is resent and recomputed.

    Carrying the input makes backward independent of per-request server state, so any peer of
    the stage can serve it (SWARM's stateless backward).
    """

    stage: int
    inputs: Payload
    grad_outputs: Payload
    token_ids: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.inputs, self.grad_outputs, self.token_ids)


@dataclass(frozen=True)
class BackwardResponse:
    """Gradient with respect to the stage's input (``None`` on the head: token ids have none)."""

    grad_inputs: Payload | None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.grad_inputs)


@dataclass(frozen=True)
class TailRequest:
    """Forward, loss and backward on the last stage in one round trip."""

    stage: int
    inputs: Payload
    targets: Payload
    token_ids: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.inputs, self.targets, self.token_ids)


@dataclass(frozen=True)
class TailResponse:
    """The micro-batch's mean loss (``None`` in timing mode) and the gradient for the previous stage."""

    loss: float | None
    grad_inputs: Payload | None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + 4 + payload_bytes(self.grad_inputs)
