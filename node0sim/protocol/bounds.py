"""Value bounds at the trust boundary: what a stage server accepts in a request and the trainer in a reply.

Every floating-point tensor a stage server receives (activations, gradients) and every one the trainer gets back must
be finite and at most ``train.max_abs_value`` in magnitude; a loss must be finite, >= 0 and at most
``train.max_loss_ratio`` x ln(vocab size). The bound is on the largest |value| because that is what overflows: one
1e38 entry makes the square in an RMSNorm, or a matmul sum, infinite; and it takes one read-only pass
(``torch.aminmax``), no temporary tensor. Payloads are checked as they travel (a codec's floating parts: subspace
coefficients, top-k values, quantization scales), so the trainer and the server run this same check on the same
tensors: a reply the trainer accepted and relays passes an honest server's boundary check.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from node0sim.protocol.messages import Packed, Payload
from node0sim.protocol.tensors import TensorSpec


def largest_magnitude(payload: Payload) -> float:
    """The largest |value| of the floating-point tensors of ``payload`` (its parts if packed): NaN if one is NaN, inf if
    one is infinite, 0.0 if there is none (a spec, integer tensors, no values)."""
    parts = payload.parts.values() if isinstance(payload, Packed) else (payload,)
    largest = 0.0
    for part in parts:
        if isinstance(part, torch.Tensor) and part.is_floating_point() and part.numel():
            lo, hi = torch.aminmax(part)
            magnitude = torch.maximum(-lo, hi).item()
            if math.isnan(magnitude):
                return magnitude
            largest = max(largest, magnitude)
    return largest


def value_problem(payload: Payload, max_abs_value: float) -> str | None:
    """What is wrong with the values of ``payload`` (None: finite and within ``max_abs_value``)."""
    return magnitude_problem(largest_magnitude(payload), max_abs_value)


def magnitude_problem(largest: float, max_abs_value: float) -> str | None:
    """What is wrong with values whose :func:`largest_magnitude` is ``largest`` (None: finite, within the bound)."""
    if not math.isfinite(largest):
        return "values are not finite (NaN or inf)"
    if largest > max_abs_value:
        return f"largest |value| {largest:.3g} is above train.max_abs_value ({max_abs_value:g})"
    return None


def check_message_values(message: Any, max_abs_value: float) -> None:
    """Refuse (ValueError naming the field) a message whose payload fields hold non-finite or too large values."""
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        if isinstance(value, (torch.Tensor, Packed)):
            problem = value_problem(value, max_abs_value)
            if problem is not None:
                raise ValueError(f"{type(message).__name__}.{field.name}: {problem}")


def loss_problem(loss: Any, max_loss: float) -> str | None:
    """What is wrong with a reported mean loss (None: a float in [0, ``max_loss``], or None: timing mode has none)."""
    if loss is None:
        return None
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or not 0 <= loss <= max_loss:
        return f"loss {loss!r} is not in [0, {max_loss:.4g}] (train.max_loss_ratio x ln(vocab size))"
    return None


def layout(payload: Payload | None) -> Any:
    """Shapes and dtypes of ``payload`` (its parts, by name, if packed), the same for a tensor and its spec."""
    if isinstance(payload, Packed):
        return tuple(payload.shape), sorted((name, layout(part)) for name, part in payload.parts.items())
    if isinstance(payload, (torch.Tensor, TensorSpec)):
        return tuple(payload.shape), payload.dtype
    return type(payload).__name__
