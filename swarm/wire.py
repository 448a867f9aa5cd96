"""Safe serialization of protocol messages for the live swarm.

Volunteers exchange messages with strangers, so nothing here unpickles: a message is msgpack
of ``{"type": <allowed class name>, "fields": {...}}``, tensors travel as ``(dtype, shape,
raw bytes)`` with the dtype taken from an allowlist, and the receiver rebuilds only the message
classes the protocol declares (``@message``, registered in ``MESSAGE_TYPES``). Anything else is
refused with a :class:`WireError` that names the problem.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import torch

import node0sim.protocol.averaging  # noqa: F401 (declares the all-reduce messages)
import node0sim.protocol.state_transfer  # noqa: F401  (registers the state messages)
import node0sim.protocol.swarm_peer  # noqa: F401  (registers the stage assignment messages)
from node0sim.protocol.messages import MESSAGE_TYPES, Packed, TensorSpec

DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool)
}

MAX_DIMS = 8
MAX_ELEMENTS = 2**48
"""Bounds on a decoded shape (a message is smaller than ``swarm.max_message_mb`` anyway; specs carry no data): torch's
stride arithmetic overflows int64 near 2**63, so a shape such as [0, 2**62, 2**62] is refused here, not by torch."""

_TENSOR, _SPEC, _PACKED = "__tensor__", "__spec__", "__packed__"


class WireError(ValueError):
    """Bytes that are not a well-formed protocol message."""


def encode(message: Any) -> bytes:
    """Serialize a protocol message (a class in ``MESSAGE_TYPES``)."""
    name = type(message).__name__
    if MESSAGE_TYPES.get(name) is not type(message):
        raise WireError(f"{name} is not a protocol message type")
    fields = {f.name: _encode_value(getattr(message, f.name)) for f in dataclasses.fields(message)}
    return msgpack.packb({"type": name, "fields": fields}, use_bin_type=True)


def decode(data: bytes) -> Any:
    """Rebuild a message from :func:`encode`'s bytes; raises :class:`WireError` on anything else."""
    try:
        document = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise WireError(f"not a msgpack document ({type(error).__name__})") from None
    if not isinstance(document, dict) or set(document) != {"type", "fields"}:
        raise WireError("message must be a {type, fields} mapping")
    cls = MESSAGE_TYPES.get(document["type"]) if isinstance(document["type"], str) else None
    if cls is None:
        raise WireError(f"unknown message type {document['type']!r}")
    fields = document["fields"]
    expected = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(fields, dict) or set(fields) != expected:
        raise WireError(f"{cls.__name__}: expected fields {sorted(expected)}")
    try:
        return cls(**{name: _decode_value(value) for name, value in fields.items()})
    except WireError:
        raise
    except (TypeError, ValueError) as error:
        raise WireError(f"{cls.__name__}: {error}") from None


def _encode_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""  # 0-d tensors too
        return {_TENSOR: [_dtype_name(tensor.dtype), list(tensor.shape), raw]}
    if isinstance(value, TensorSpec):
        return {_SPEC: [_dtype_name(value.dtype), list(value.shape)]}
    if isinstance(value, Packed):
        return {_PACKED: [{k: _encode_value(v) for k, v in value.parts.items()}, list(value.shape)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise WireError(f"cannot send a {type(value).__name__}")


def _decode_value(value: Any) -> Any:
    if not isinstance(value, dict):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise WireError(f"unexpected {type(value).__name__} field")
    if len(value) != 1:
        raise WireError("a tensor field must have exactly one tag")
    (tag, body), = value.items()
    if tag == _TENSOR:
        dtype_name, shape, raw = _unpack(body, 3, tag)
        return _tensor(_dtype(dtype_name), _shape(shape), raw)
    if tag == _SPEC:
        dtype_name, shape = _unpack(body, 2, tag)
        return TensorSpec(_shape(shape), _dtype(dtype_name))
    if tag == _PACKED:
        parts, shape = _unpack(body, 2, tag)
        if not isinstance(parts, dict) or not all(isinstance(k, str) for k in parts):
            raise WireError("packed parts must be a name -> tensor mapping")
        decoded = {k: _decode_value(v) for k, v in parts.items()}
        if not all(isinstance(part, (torch.Tensor, TensorSpec)) for part in decoded.values()):
            raise WireError("packed parts must be tensors")
        return Packed(decoded, _shape(shape))
    raise WireError(f"unknown field tag {tag!r}")


def _unpack(body: Any, count: int, tag: str) -> list[Any]:
    if not isinstance(body, list) or len(body) != count:
        raise WireError(f"{tag} must be a list of {count} items")
    return body


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise WireError(f"dtype {name} cannot be sent")
    return name


def _dtype(name: Any) -> torch.dtype:
    if name not in DTYPES:
        raise WireError(f"dtype {name!r} is not allowed; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise WireError(f"bad tensor shape {shape!r}")
    extent = 1
    for size in shape:  # torch's strides are the products of the later sizes: bound them (zeros count as 1)
        extent *= max(size, 1)
    if len(shape) > MAX_DIMS or extent > MAX_ELEMENTS:
        raise WireError(f"tensor shape {shape!r} is too large (at most {MAX_DIMS} dims and {MAX_ELEMENTS} elements)")
    return tuple(shape)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], raw: Any) -> torch.Tensor:
    if not isinstance(raw, bytes):
        raise WireError("tensor data must be bytes")
    count = 1
    for size in shape:
        count *= size
    if len(raw) != count * dtype.itemsize:
        raise WireError(f"tensor of shape {list(shape)} and dtype {dtype} needs {count * dtype.itemsize} bytes, got {len(raw)}")
    if not count:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
