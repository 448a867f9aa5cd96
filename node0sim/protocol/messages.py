"""Messages between trainers and stage servers, the RPC method names, and how many bytes each message puts on the wire.

A payload is either a real tensor (numerics mode) or a :class:`TensorSpec` (timing mode: the
same shape and dtype, no data). Either way the network is charged the same bytes.

Every message class is declared with :func:`message`, which registers it in :data:`MESSAGE_TYPES`:
the live wire format decodes those classes and nothing else.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from typing import TypeVar

import torch

from node0sim.protocol.tensors import TensorSpec

HEADER_BYTES = 64
"""Per-message framing: method, stage index, tensor shapes and dtypes, the epoch stamp of forward responses and
backward requests, and the request id and accumulate flag of backward and tail requests. They fit in the room the
header already has: the fullest message, a backward request to a tail served in separate calls, needs a method name
(8 bytes), stage and epoch (4 each), four tensors' shapes ([B, T, d] inputs and three [B, T]: the loss gradient,
token ids, targets; 9 dims x 4 bytes) and dtypes (1 byte each), a 4-byte request id and a 1-byte accumulate flag:
61 bytes; so they cost no bytes."""

FORWARD = "forward"
BACKWARD = "backward"
TAIL = "tail"
GET_STATE = "get_state"
PROBE = "probe"
"""A trainer's check that a newly listed peer answers for its stage before it gets work (``train.probe_timeout_s``)."""
REDUCE_PART = "reduce_part"
GATHER_PART = "gather_part"
PIPE_FORWARD = "pipe_forward"
PIPE_BACKWARD = "pipe_backward"
PIPE_METHODS = (PIPE_FORWARD, PIPE_BACKWARD)
"""The RPC methods of the direct pipeline (``topology.pipeline=direct``: stage to stage, see ``direct.py``)."""
STAGE_METHODS = (FORWARD, BACKWARD, TAIL, *PIPE_METHODS)
"""The RPC methods of the pipeline (a stage server serves ``forward`` and ``backward``; the last stage also ``tail``;
with the direct pipeline, ``pipe_forward`` and ``pipe_backward``)."""
AVERAGING_METHODS = (REDUCE_PART, GATHER_PART)
"""The RPC methods of the protocol's in-stage all-reduce."""

MESSAGE_TYPES: dict[str, type] = {}
"""Every message class of the protocol, by class name (filled by :func:`message`)."""

M = TypeVar("M", bound=type)


def message(cls: M) -> M:
    """Class decorator of a protocol message: makes ``cls`` a frozen dataclass and registers it in :data:`MESSAGE_TYPES`."""
    if cls.__name__ in MESSAGE_TYPES:
        raise TypeError(f"two message classes are named {cls.__name__}")
    cls = dataclass(frozen=True)(cls)
    MESSAGE_TYPES[cls.__name__] = cls
    return cls


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
        return sum(part.nbytes for part in self.parts.values())


Payload = torch.Tensor | TensorSpec | Packed


def payload_bytes(*payloads: Payload | None) -> int:
    """Wire size of ``payloads`` (``None`` entries are absent fields)."""
    return sum(payload.nbytes for payload in payloads if payload is not None)


def leading_dims(payload: Payload) -> tuple[int, int]:
    """``(batch, seq_len)`` of a token or activation payload; a ValueError if it has fewer than two dimensions."""
    if len(payload.shape) < 2:
        raise ValueError(f"expected a [batch, seq_len, ...] payload, got shape {list(payload.shape)}")
    return payload.shape[0], payload.shape[1]


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, tuple[type, ...], tuple[type, ...]], ...]:
    """``(field, the types it may hold, those but Packed)`` of a message class, resolved once (``typing.get_type_hints``
    evaluates every annotation string on each call: a quarter of a Node0-scale simulation's wall time when per request)."""
    fields = []
    for name, hint in typing.get_type_hints(cls).items():
        allowed = typing.get_args(hint) or (hint,)
        plain = tuple(t for t in allowed if t is not Packed) + ((int,) if float in allowed else ())
        fields.append((name, allowed, plain))
    return tuple(fields)


def check_message(request: object, cls: type) -> None:
    """Refuse (ValueError, naming the field) a request that is not a ``cls`` or whose fields do not have their declared
    types: a payload field holds a tensor, a spec or a packed payload of those; an ``int`` field an int (not a bool), a
    ``float`` field a float or an int (a sample count as a weight)."""
    if type(request) is not cls:
        raise ValueError(f"expected a {cls.__name__}, got a {type(request).__name__}")
    for name, allowed, plain in _field_types(cls):
        value = getattr(request, name)
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, Packed):
            parts_ok = all(isinstance(part, (torch.Tensor, TensorSpec)) for part in value.parts.values())
            if Packed in allowed and parts_ok:
                continue
        elif isinstance(value, bool):
            if bool in allowed:
                continue
        elif isinstance(value, plain):
            continue
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"{cls.__name__}.{name}: expected {names}, got {type(value).__name__}")


@message
class ProbeRequest:
    """Ask a server whether it serves ``stage`` (it answers with a :class:`ProbeResponse`, or refuses another stage)."""

    stage: int

    def wire_bytes(self) -> int:
        return HEADER_BYTES


@message
class ProbeResponse:
    """The stage the probed server serves."""

    stage: int

    def wire_bytes(self) -> int:
        return HEADER_BYTES


@message
class ForwardRequest:
    """Run stage ``stage`` forward on ``inputs`` (token ids for the head, boundary activations otherwise).

    ``token_ids`` travel with the activations when the boundary codec needs them (subspace compression).
    ``targets``: only to the tail served in separate calls (``topology.tail_calls=separate``, as Node0's tail expert),
    whose forward then returns the per-token loss [B, T] instead of the logits.
    """

    stage: int
    inputs: Payload
    token_ids: Payload | None = None
    targets: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.inputs, self.token_ids, self.targets)


@message
class ForwardResponse:
    """The stage's output activations and ``epoch``, the epoch of the weights that computed them (the trainer
    echoes it in the backward request, so the server can measure the delay)."""

    outputs: Payload
    epoch: int = 0

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.outputs)


@message
class BackwardRequest:
    """Backward through stage ``stage``: the forward input is resent and recomputed.

    Carrying the input makes backward independent of per-request server state, so any peer of
    the stage can serve it (SWARM's stateless backward). ``epoch``: the forward response's stamp, echoed.
    ``targets``: only to the tail served in separate calls, whose ``grad_outputs`` is the gradient of the
    per-token loss [B, T] its forward returned (the loss is recomputed too).
    """

    stage: int
    inputs: Payload
    grad_outputs: Payload
    token_ids: Payload | None = None
    epoch: int = 0
    request_id: int = 0
    """The micro-batch's id (0: none); a server accumulates one micro-batch's gradient once (retries are duplicates)."""
    accumulate: bool = True
    """False: return the input gradient only (a retry of a request that timed out at a peer that may still accumulate
    it), so the stage accumulates the micro-batch at most once."""
    targets: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.inputs, self.grad_outputs, self.token_ids, self.targets)


@message
class BackwardResponse:
    """Gradient with respect to the stage's input (``None`` on the head: token ids have none)."""

    grad_inputs: Payload | None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.grad_inputs)


@message
class TailRequest:
    """Forward, loss and backward on the last stage in one round trip (one call: its delay is 0 by construction)."""

    stage: int
    inputs: Payload
    targets: Payload
    token_ids: Payload | None = None
    request_id: int = 0
    """As :attr:`BackwardRequest.request_id`."""
    accumulate: bool = True
    """As :attr:`BackwardRequest.accumulate`."""

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.inputs, self.targets, self.token_ids)


@message
class TailResponse:
    """The micro-batch's mean loss (``None`` in timing mode) and the gradient for the previous stage."""

    loss: float | None
    grad_inputs: Payload | None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + 4 + payload_bytes(self.grad_inputs)


@message
class PipeForwardRequest:
    """Direct pipeline: run stage ``stage`` forward and pass the output on to a peer of the next stage (the tail: forward,
    loss and backward, keeping the input gradient for :class:`PipeBackwardRequest`).

    ``origin``, ``request_id`` and ``attempt`` name one try of one micro-batch: the servers on its path keep their
    input under that key until its backward. Stages below ``accumulate_below`` accumulate its gradient (a retry after a
    failure leaves out the stages that may have accumulated it already). ``backward_now``: the tail starts the backward
    pass at once (1F1B); otherwise the trainer starts it with a :class:`PipeBackwardRequest` to the tail (GPipe).
    ``targets`` travel along the path to the tail.
    """

    stage: int
    inputs: Payload
    targets: Payload
    origin: str
    request_id: int
    attempt: int
    accumulate_below: int
    backward_now: bool
    token_ids: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + len(self.origin.encode()) + payload_bytes(self.inputs, self.targets, self.token_ids)


@message
class PipeBackwardRequest:
    """Direct pipeline: backward through stage ``stage`` of the micro-batch try its forward kept the input of, then on to
    the peer of the previous stage that sent it. ``grad_outputs``: None in the trainer's request to the tail (which
    kept its input gradient)."""

    stage: int
    origin: str
    request_id: int
    attempt: int
    grad_outputs: Payload | None = None

    def wire_bytes(self) -> int:
        return HEADER_BYTES + len(self.origin.encode()) + payload_bytes(self.grad_outputs)


PIPE_FAILURES = ("timeout", "no_peer", "refused")
"""Why a hop of the direct pipeline failed: no answer in time, no available peer of the stage, or an error answer."""


@message
class PipeResponse:
    """What a direct-pipeline call returns along its path: the micro-batch's loss (``None`` in timing mode or from a
    backward) and the ``tail`` peer that keeps its input gradient; or, when a hop failed, the stage it failed at, why
    (one of :data:`PIPE_FAILURES`) and ``accumulate_below`` for the retry (stages at or above it may have accumulated
    this micro-batch already)."""

    loss: float | None = None
    tail: str = ""
    failed_stage: int = -1
    failure: str = ""
    accumulate_below: int = 0

    @property
    def ok(self) -> bool:
        """Whether every hop succeeded."""
        return self.failed_stage < 0

    def wire_bytes(self) -> int:
        return HEADER_BYTES + 4 + len(self.tail.encode())
