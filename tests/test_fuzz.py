"""Property-based fuzzing (hypothesis) of the live wire decoder and of every RPC handler of the protocol.

- The decoder, on arbitrary bytes, on arbitrary msgpack documents, and on real encodings of every message class
  mutated (bytes flipped or cut; any node of the document replaced: shapes, dtypes, data lengths, tags, nesting,
  huge and negative numbers), returns a well-formed message (tensor data no larger than the input, shapes within
  the wire's bounds, packed parts that are tensors) or raises :class:`WireError`, nothing else.
- Every handler a stage server and the organizer register (a test checks the list against what they serve), called in the
  simulator with what the wire can deliver (the right and wrong message classes; tensors of random shape and dtype,
  0-d, 1-d, empty, int, bool, NaN, inf; non-tensor fields), answers a response of its method's class that the wire
  can send, or refuses with ``ValueError`` / ``RPCError`` (the runtime's contract); within a bound of virtual time;
  and answers a valid request after that.

The fast suite runs ``FAST_EXAMPLES`` examples per property with a fixed seed (deterministic); the long one 10,000
(``pytest -m long``: 4 minutes, kept out of ``make test`` so the suite stays within its time).
Every bug found is an ``@example`` below.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node0sim.model import build_stages
from node0sim.protocol.averaging import MAX_EARLY_ROUNDS, Ack, AveragingConfig, GatherPart, ReducePart
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.direct import DirectConfig
from node0sim.protocol.messages import (
    BACKWARD,
    FORWARD,
    GATHER_PART,
    GET_STATE,
    MESSAGE_TYPES,
    PIPE_BACKWARD,
    PIPE_FORWARD,
    PROBE,
    REDUCE_PART,
    TAIL,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    Packed,
    PipeBackwardRequest,
    PipeForwardRequest,
    PipeResponse,
    ProbeRequest,
    ProbeResponse,
    TailRequest,
    TailResponse,
    check_message,
)
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.state_transfer import StateRequest, StateResponse
from node0sim.protocol.swarm_peer import ASSIGN_STAGE, StageAssignment, StageOrganizer, StageRequest
from node0sim.protocol.tensors import TensorSpec
from node0sim.runtime import RPCError
from swarm.wire import DTYPES, MAX_DIMS, MAX_ELEMENTS, WireError, decode, encode
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG

FAST_EXAMPLES = 200
SLOW_EXAMPLES = 10_000
EXAMPLES = [pytest.param(FAST_EXAMPLES, id="fast"), pytest.param(SLOW_EXAMPLES, id="slow", marks=[pytest.mark.slow, pytest.mark.long])]


def _fuzz(examples: int, strategy: st.SearchStrategy, check) -> None:
    """Run the property ``check`` on ``examples`` examples of ``strategy`` (derandomized: the same ones every run)."""
    settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given(strategy)(check))()


# ---- values the wire can carry -------------------------------------------------------------------------------

DTYPE_LIST = list(DTYPES.values())
SIZES = (0, 1, 2, 3, CFG.dim, CFG.max_seq_len + 1)
FILLS = ("normal", "tokens", "zeros", "extreme", "nan", "inf")


def _make_tensor(shape: tuple[int, ...], dtype: torch.dtype, fill: str, seed: int) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype``: random normal values, token ids (a few out of range), zeros, the dtype's
    extremes, or normal values with one NaN or inf."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if fill == "extreme":
        info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
        negative = torch.randint(0, 2, shape, generator=g).bool()
        return torch.where(negative, torch.tensor(info.min, dtype=dtype), torch.tensor(info.max, dtype=dtype))
    if not dtype.is_floating_point:
        low, high = (-1, CFG.vocab_size + 1) if fill == "tokens" else (0, CFG.vocab_size)
        return torch.randint(low, high, shape, generator=g).to(dtype)
    values = torch.zeros(shape) if fill == "zeros" else torch.randn(shape, generator=g)
    if fill in ("nan", "inf") and values.numel():
        values.view(-1)[seed % values.numel()] = float(fill)
    return values.to(dtype)


def _tensors(shapes: st.SearchStrategy, dtypes: st.SearchStrategy = st.sampled_from(DTYPE_LIST),
             fills: st.SearchStrategy = st.sampled_from(FILLS)) -> st.SearchStrategy:
    return st.builds(_make_tensor, shapes, dtypes, fills, st.integers(0, 2**16))


MAX_FUZZ_ELEMENTS = 4096
"""A fuzzed tensor's size bound (the wire's are far larger): the shapes that matter have few elements."""


def _bounded(shape: list[int]) -> tuple[int, ...]:
    """``shape`` without the trailing dimensions that take it over ``MAX_FUZZ_ELEMENTS`` values."""
    while math.prod(shape) > MAX_FUZZ_ELEMENTS:
        shape = shape[:-1]
    return tuple(shape)


SHAPES = st.lists(st.sampled_from(SIZES), max_size=4).map(_bounded)
TENSORS = _tensors(SHAPES)
SPECS = st.builds(TensorSpec, st.lists(st.integers(0, 2**12), max_size=4).map(tuple), st.sampled_from(DTYPE_LIST))
PART_NAMES = st.sampled_from(["parameters", "exp_avg", "exp_avg_sq", "updates", "values", "index", ""])
PACKED = st.builds(Packed, st.dictionaries(PART_NAMES, st.one_of(TENSORS, SPECS), max_size=3), SHAPES)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=6))
WIRE_VALUES = st.one_of(SCALARS, TENSORS, SPECS, PACKED)
"""Anything a decoded message's field may hold."""


# ---- the wire decoder ----------------------------------------------------------------------------------------

TOKENS = torch.randint(0, CFG.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
HIDDEN = torch.randn(2, 4, CFG.dim, generator=torch.Generator().manual_seed(1))
SAMPLES = [  # one message of every class
    ForwardRequest(0, TOKENS, TOKENS.to(torch.int32), TOKENS), ForwardResponse(HIDDEN, epoch=3),
    BackwardRequest(1, HIDDEN, HIDDEN, epoch=2, request_id=7, accumulate=False, targets=TOKENS), BackwardResponse(HIDDEN),
    TailRequest(1, HIDDEN, TOKENS, request_id=9), TailResponse(2.5, HIDDEN),
    PipeForwardRequest(0, TOKENS, TOKENS, "trainer", 3, 1, 2, True), PipeBackwardRequest(1, "trainer", 3, 1, HIDDEN),
    PipeResponse(1.5, "tail"), ReducePart(0, "grad/0", torch.randn(5), 4), GatherPart(0, "grad/0", 1, torch.randn(5)),
    Ack(), StateRequest(0), StateResponse(1, Packed({"parameters": torch.randn(6), "updates": torch.tensor([1])}, (6,))),
    StageRequest(2.0), StageAssignment(1), ProbeRequest(1), ProbeResponse(1),
]
ENCODED = [encode(message) for message in SAMPLES]


def _check_decoded(value: object, size: int) -> None:
    """A decoded field holds what the wire allows: data no larger than the ``size`` bytes it came in, bounded shapes."""
    if isinstance(value, torch.Tensor):
        assert value.dtype in DTYPE_LIST and value.dim() <= MAX_DIMS and value.numel() * value.element_size() <= size
    elif isinstance(value, TensorSpec):
        assert value.dim() <= MAX_DIMS and value.numel() <= MAX_ELEMENTS and value.dtype in DTYPE_LIST
    elif isinstance(value, Packed):
        assert all(isinstance(part, (torch.Tensor, TensorSpec)) for part in value.parts.values()), value
        assert isinstance(value.shape, tuple) and all(type(s) is int for s in value.shape)
        for part in value.parts.values():
            _check_decoded(part, size)
    else:
        assert value is None or isinstance(value, (bool, int, float, str)), type(value)


def _check_decode(data: bytes) -> None:
    """``decode`` refuses ``data`` with a WireError, or returns a well-formed message that re-encodes stably."""
    try:
        message = decode(data)
    except WireError:
        return
    assert MESSAGE_TYPES[type(message).__name__] is type(message)
    for value in vars(message).values():
        _check_decoded(value, len(data))
    again = encode(message)
    assert encode(decode(again)) == again


def test_the_samples_cover_every_message_class():
    assert {type(message) for message in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("examples", EXAMPLES)
def test_decoding_arbitrary_bytes_returns_a_message_or_a_wire_error(examples):
    _fuzz(examples, st.binary(max_size=256), _check_decode)


MSGPACK_INTS = st.integers(-2**63, 2**64 - 1)
MSGPACK_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), MSGPACK_INTS, st.floats(), st.text(max_size=12), st.binary(max_size=64)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), MSGPACK_INTS), inner, max_size=4)),
    max_leaves=12,
)
DOCUMENTS = st.one_of(
    MSGPACK_VALUES,
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(sorted(MESSAGE_TYPES)), MSGPACK_VALUES), "fields": MSGPACK_VALUES}),
)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_decoding_arbitrary_msgpack_documents_returns_a_message_or_a_wire_error(examples):
    _fuzz(examples, DOCUMENTS.map(lambda document: msgpack.packb(document, use_bin_type=True)), _check_decode)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """The path (keys and indices) of every node of a decoded msgpack document, the root included."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [prefix] + [path for key, child in children for path in _paths(child, (*prefix, key))]


def _replaced(document: object, path: tuple, value: object) -> object:
    if not path:
        return value
    document = copy.copy(document)
    document[path[0]] = _replaced(document[path[0]], path[1:], value)
    return document


HOSTILE = st.one_of(  # what a mutation puts in a node: hostile numbers, shapes, dtype names, data, tags, nesting
    MSGPACK_VALUES,
    st.sampled_from([-1, 2**62, 2**63 - 1, 2**64 - 1, -2**63, float("nan"), float("inf"), True, "__tensor__", "__packed__"]),
    st.lists(st.sampled_from([0, 1, 3, 2**31, 2**62, -1]), max_size=MAX_DIMS + 2),
    st.sampled_from([*DTYPES, "object", "float128", "complex64"]),
    st.binary(max_size=128),
    st.builds(lambda tag, body: {tag: body}, st.sampled_from(["__tensor__", "__spec__", "__packed__", "__pickle__"]), MSGPACK_VALUES),
)


@st.composite
def _mutated_documents(draw) -> bytes:
    """A real encoding of one message with 1 to 3 of its document's nodes replaced."""
    document = msgpack.unpackb(draw(st.sampled_from(ENCODED)), raw=False)
    for _ in range(draw(st.integers(1, 3))):
        document = _replaced(document, draw(st.sampled_from(_paths(document))), draw(HOSTILE))
    return msgpack.packb(document, use_bin_type=True)


@st.composite
def _mutated_bytes(draw) -> bytes:
    """A real encoding with some bytes replaced, then possibly cut short."""
    data = bytearray(draw(st.sampled_from(ENCODED)))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


PACKED_PART_INT = msgpack.packb({"type": "StateResponse", "fields": {"epoch": 0, "queries": None, "state": {
    "__packed__": [{"parameters": 5}, [1]]}}}, use_bin_type=True)
"""Found by the fuzz: a packed part that is not a tensor was decoded (and ``Packed.nbytes`` then raised AttributeError)."""


@pytest.mark.parametrize("examples", EXAMPLES)
def test_decoding_mutated_encodings_returns_a_message_or_a_wire_error(examples):
    @example(PACKED_PART_INT)
    def check(data):
        _check_decode(data)

    _fuzz(examples, st.one_of(_mutated_documents(), _mutated_bytes()), check)


# ---- the handlers ----------------------------------------------------------------------------------------------

STAGE_OF = {"head": 0, "tail": 1}
METHODS = {  # (peer, method) -> (the request class, the response class)
    **{(peer, method): pair for peer in STAGE_OF for method, pair in {
        FORWARD: (ForwardRequest, ForwardResponse), BACKWARD: (BackwardRequest, BackwardResponse),
        GET_STATE: (StateRequest, StateResponse), PROBE: (ProbeRequest, ProbeResponse), PIPE_FORWARD: (PipeForwardRequest, PipeResponse),
        PIPE_BACKWARD: (PipeBackwardRequest, PipeResponse), REDUCE_PART: (ReducePart, Ack), GATHER_PART: (GatherPart, Ack),
    }.items()},
    ("tail", TAIL): (TailRequest, TailResponse),
    ("organizer", ASSIGN_STAGE): (StageRequest, StageAssignment),
}
BAN_S = 1.0
"""How long a server's direct-pipeline router bans a next-stage peer that refused a hop. A refusal bans it whatever
the reason, also when the request it forwarded was bad (the fuzz found this: one malformed or duplicate try makes
the head ban the tail): the valid requests after the fuzz come once the bans are over."""
HANG_S = 1000.0
"""Virtual seconds a handler may take: more than any waits (the longest, a direct forward's nested hops, 3 x 30 s)."""
COMPUTES = [TensorStageCompute(stage, OptimConfig(), DenseCodec()) for stage in build_stages(CFG, 2, seed=0)]


class Swarm:
    """A fresh simulation: a head and a tail server (direct pipeline on), an organizer, and a client that calls them."""

    def __init__(self):
        self.sim = make_sim()
        self.runtimes = {name: add(self.sim, name).runtime for name in ("client", *STAGE_OF, "organizer")}
        self.run(self._start())

    async def _start(self) -> None:
        for name, compute in zip(STAGE_OF, COMPUTES):
            compute.take_gradients()  # what earlier examples accumulated
            server = StageServer(self.runtimes[name], "run", compute, AveragingConfig(10**6), throughput=1.0, bandwidth_mbps=50,
                                 direct=DirectConfig(len(STAGE_OF), ban_s=BAN_S, max_ban_s=BAN_S))
            await server.start()
        StageOrganizer(self.runtimes["organizer"], "run", len(STAGE_OF), pending_s=60.0).serve()

    def handlers(self) -> dict[tuple[str, str], object]:
        """Every (peer, method) served, and its handler."""
        return {(name, method): handler for name, rt in self.runtimes.items() for method, handler in rt.peer.handlers.items()}

    def run(self, coro) -> object:
        """The result of ``coro`` run by the client, which must end within ``HANG_S`` virtual seconds (a bug that any
        task of the simulation raises propagates)."""
        env = self.sim.env
        task = self.runtimes["client"].spawn(coro)
        env.run(until=env.any_of([task.process, env.timeout(HANG_S)]))
        assert not task.process.is_alive, f"no answer within {HANG_S} virtual seconds"
        return task.process.value

    def answer(self, peer: str, method: str, request: object) -> object:
        """The handler's response, or the ValueError / RPCError it refused ``request`` with."""
        handler = self.handlers()[peer, method]

        async def call():
            try:
                return await handler("client", request)
            except (ValueError, RPCError) as refusal:
                return refusal

        return self.run(call())


def test_the_fuzz_covers_every_handler_served():
    assert set(Swarm().handlers()) == set(METHODS)


VALID_REQUEST_ID = 987_654_321
"""Request ids of the valid requests (not among the fuzzed ones: a server answers an id once)."""


def _valid_request(peer: str, method: str, request_id: int, batch: int = 2, seq_len: int = 4, seed: int = 0) -> object:
    """A request ``method`` of ``peer`` answers, of ``batch`` sequences of ``seq_len`` tokens (a backward of the direct
    pipeline: after a forward that keeps its input)."""
    stage = STAGE_OF.get(peer, 0)
    head = peer == "head"
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (batch, seq_len), generator=g)
    hidden = torch.randn(batch, seq_len, CFG.dim, generator=g)
    inputs = tokens if head else hidden
    return {
        FORWARD: ForwardRequest(stage, inputs),
        BACKWARD: BackwardRequest(stage, inputs, hidden if head else torch.ones(batch, seq_len), targets=None if head else tokens),
        TAIL: TailRequest(stage, inputs, tokens, request_id=request_id),
        GET_STATE: StateRequest(stage),
        PROBE: ProbeRequest(stage),
        PIPE_FORWARD: PipeForwardRequest(stage, inputs, tokens, "client", request_id, 0, 2, backward_now=False),
        PIPE_BACKWARD: PipeBackwardRequest(stage, "client", request_id, 0, hidden if head else None),
        REDUCE_PART: ReducePart(stage, "valid", torch.ones(4), 2),
        GATHER_PART: GatherPart(stage, "valid", 0, torch.ones(4)),
        ASSIGN_STAGE: StageRequest(1.0),
    }[method]


def _check_answer(peer: str, method: str, response: object) -> None:
    """A response of the method's class, with well-typed fields, that the wire can send; or a refusal."""
    if isinstance(response, (ValueError, RPCError)):
        return
    check_message(response, METHODS[peer, method][1])
    decode(encode(response))


def _check_still_serves(swarm: Swarm, peer: str, method: str, request_id: int) -> None:
    """``method`` of ``peer`` answers a valid request (a direct backward: of a try the head's forward started, which the
    head and the tail keep)."""
    if method == PIPE_BACKWARD:
        assert swarm.answer("head", PIPE_FORWARD, _valid_request("head", PIPE_FORWARD, request_id)).ok
    request = _valid_request(peer, method, request_id)
    if isinstance(request, (ReducePart, GatherPart)):  # a round of its own: a sender refused in a round stays refused there
        request = dataclasses.replace(request, tag="after the fuzz")
    response = swarm.answer(peer, method, request)
    assert type(response) is METHODS[peer, method][1], response
    assert getattr(response, "ok", True), response


_FIELD_INTS = st.one_of(st.integers(-2, 3), st.sampled_from([2**31, 2**63 - 1, -2**62]))


def _near_valid(field: str, stage: int, batch: int, seq_len: int) -> st.SearchStrategy | None:
    """Values of ``field`` that pass the class and type checks, so that the fuzz reaches the deeper ones."""
    tokens = _tensors(st.just((batch, seq_len)), st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]),
                      st.sampled_from(["tokens", "normal", "extreme"]))
    hidden = _tensors(st.sampled_from([(batch, seq_len, CFG.dim), (batch, seq_len), (batch, CFG.dim)]),
                      st.sampled_from([torch.float32, torch.float16, torch.float64]), st.sampled_from(FILLS))
    strategies = {
        "stage": st.one_of(st.just(stage), st.integers(-1, 2)), "inputs": tokens if stage == 0 else hidden,
        "token_ids": st.one_of(st.none(), tokens), "targets": st.one_of(st.none(), tokens), "grad_outputs": hidden,
        "epoch": _FIELD_INTS, "request_id": _FIELD_INTS, "attempt": _FIELD_INTS, "accumulate_below": _FIELD_INTS, "part": _FIELD_INTS,
        "accumulate": st.booleans(), "backward_now": st.booleans(), "origin": st.sampled_from(["client", "head", "tail", ""]),
        "tag": st.sampled_from(["valid", "grad/0", ""]), "throughput": st.one_of(st.floats(), st.integers(-1, 2)),
        "values": _tensors(st.sampled_from([(4,), (0,), (), (2, 2)]), st.sampled_from([torch.float32, torch.int64])),
        "weight": st.one_of(st.floats(), st.integers(-1, 2)),
    }
    return strategies.get(field)


def _field_values(field: str, stage: int, batch: int, seq_len: int, near_share: int = 1) -> st.SearchStrategy:
    """Values of ``field``: near-valid ones ``near_share`` times as often as any value the wire carries."""
    near = _near_valid(field, stage, batch, seq_len)
    return WIRE_VALUES if near is None else st.one_of(*[near] * near_share, WIRE_VALUES)


@st.composite
def _calls(draw) -> list[tuple[str, str, object]]:
    """A (peer, method, request) the wire can deliver: three times in four a valid request with at most two fields
    changed (mostly to near-valid values; a direct backward after the head's forward of its try), else a message of
    any class with any fields."""
    peer, method = draw(st.sampled_from(sorted(METHODS)))
    stage = STAGE_OF.get(peer, 0)
    batch, seq_len = draw(st.sampled_from([0, 1, 3])), draw(st.sampled_from([0, 1, 4, CFG.max_seq_len, CFG.max_seq_len + 1]))
    if not draw(st.integers(0, 3)):
        cls = draw(st.one_of(st.just(METHODS[peer, method][0]), st.sampled_from(sorted(MESSAGE_TYPES.values(), key=lambda c: c.__name__))))
        request = cls(**{f.name: draw(_field_values(f.name, stage, batch, seq_len)) for f in dataclasses.fields(cls)})
        return [(peer, method, decode(encode(request)))]
    valid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, CFG.max_seq_len)), draw(st.integers(0, 2**16)))
    request = _valid_request(peer, method, *valid)
    changed = {draw(st.sampled_from([f.name for f in dataclasses.fields(request)])) for _ in range(draw(st.integers(0, 2)))}
    request = dataclasses.replace(request, **{name: draw(_field_values(name, stage, batch, seq_len, 3)) for name in changed})
    forward = [("head", PIPE_FORWARD, _valid_request("head", PIPE_FORWARD, *valid))] if method == PIPE_BACKWARD else []
    return [*forward, (peer, method, decode(encode(request)))]


def _check_handlers(calls: list[tuple[str, str, object]]) -> None:
    """Each call gets a response of its class or a refusal, within ``HANG_S``; then (once bans are over) each method
    called still answers a valid request (fewer calls than ``MAX_EARLY_ROUNDS``: junk rounds do not fill the averager's
    room for new ones)."""
    swarm = Swarm()
    for peer, method, request in calls:
        _check_answer(peer, method, swarm.answer(peer, method, request))
    swarm.run(swarm.runtimes["client"].sleep(2 * BAN_S))
    for i, (peer, method) in enumerate(sorted({(peer, method) for peer, method, _ in calls})):
        _check_still_serves(swarm, peer, method, VALID_REQUEST_ID + i)


CALLS = st.lists(_calls(), min_size=1, max_size=MAX_EARLY_ROUNDS - 1).map(lambda groups: [call for group in groups for call in group])
FOUND = [  # what the fuzz found, each an internal error before its fix
    [("head", REDUCE_PART, Ack())],  # AttributeError: the averager's handlers did not check the message class
    [("head", GATHER_PART, Ack())],
    [("organizer", ASSIGN_STAGE, Ack())],  # ... nor the organizer's
    [("organizer", ASSIGN_STAGE, StageRequest(None))],  # TypeError: None > 0
    [("head", BACKWARD, BackwardRequest(0, TOKENS, HIDDEN, epoch=-2**62))],  # MemoryError: a delay histogram of 2^62 slots
]


@pytest.mark.parametrize("examples", EXAMPLES)
def test_every_handler_answers_or_refuses_fuzzed_requests_and_serves_on(examples):
    def check(calls):
        _check_handlers(calls)

    for calls in FOUND:
        check = example(calls)(check)
    _fuzz(examples, CALLS, check)
