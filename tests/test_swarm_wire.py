"""The live swarm's wire format: protocol messages round-trip; anything else is refused by name."""

import msgpack
import pytest
import torch

from node0sim.protocol.averaging import Ack, ReducePart
from node0sim.protocol.messages import (
    MESSAGE_TYPES,
    BackwardRequest,
    ForwardRequest,
    ForwardResponse,
    Packed,
    TailRequest,
    TailResponse,
    TensorSpec,
    message,
)
from node0sim.protocol.stage_server import StateResponse
from swarm.wire import WireError, decode, encode


@pytest.mark.parametrize(
    "message",
    [
        ForwardRequest(1, torch.randn(2, 3, 4), torch.arange(6, dtype=torch.int32).reshape(2, 3)),
        BackwardRequest(0, torch.randint(0, 9, (2, 5)), torch.randn(2, 5, 4).to(torch.bfloat16)),
        BackwardRequest(2, torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.int32), epoch=17),
        ForwardResponse(torch.randn(2, 3, 4), epoch=2**40),
        TailResponse(None, None),
        TailResponse(2.5, torch.zeros(0, 4)),
        ReducePart(3, "tag", TensorSpec((7,), torch.float16), 1.5),
        StateResponse(4, Packed({"values": torch.randn(5), "index": torch.tensor([1, 2])}, (5,))),
        Ack(),
    ],
)
def test_protocol_messages_round_trip(message):
    back = decode(encode(message))
    assert type(back) is type(message)
    for name, value in vars(message).items():
        other = getattr(back, name)
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and torch.equal(other, value)
        elif isinstance(value, Packed):
            assert other.shape == value.shape and all(torch.equal(other.parts[k], v) for k, v in value.parts.items())
        else:
            assert other == value


def _document(fields, kind="ForwardRequest"):
    return msgpack.packb({"type": kind, "fields": fields}, use_bin_type=True)


def _tensor(dtype, shape, raw):
    return {"__tensor__": [dtype, shape, raw]}


@pytest.mark.parametrize(
    "data,complaint",
    [
        (b"\xc1garbage", "msgpack"),
        (_document({}, kind="os.system"), "unknown message type"),
        (_document({"stage": 0}), "expected fields"),
        (_document({"stage": 0, "inputs": _tensor("float32", [2, 2], b"\0" * 15), "token_ids": None, "targets": None}), "needs 16 bytes"),
        (_document({"stage": 0, "inputs": _tensor("object", [1], b"\0"), "token_ids": None, "targets": None}), "not allowed"),
        (_document({"stage": 0, "inputs": _tensor("float32", [-1], b""), "token_ids": None, "targets": None}), "bad tensor shape"),
        (_document({"stage": 0, "inputs": {"__pickle__": b"x"}, "token_ids": None, "targets": None}), "unknown field tag"),
        (_document({"stage": 0, "inputs": [1, 2], "token_ids": None, "targets": None}), "unexpected list"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(data, complaint):
    with pytest.raises(WireError, match=complaint):
        decode(data)


def test_only_protocol_types_can_be_sent():
    with pytest.raises(WireError, match="not a protocol message"):
        encode({"stage": 0})


def test_the_wire_decodes_every_declared_message_class_and_their_names_are_unique():
    assert {
        "ForwardRequest", "ForwardResponse", "BackwardRequest", "BackwardResponse", "TailRequest", "TailResponse",
        "ReducePart", "GatherPart", "Ack", "StateRequest", "StateResponse",
    } <= set(MESSAGE_TYPES)
    with pytest.raises(TypeError, match="two message classes are named Ack"):

        @message
        class Ack:
            pass


def test_the_epoch_stamp_travels_and_is_counted_inside_the_header():
    outputs = torch.randn(2, 3, 4)
    stamped = decode(encode(ForwardResponse(outputs, epoch=9)))
    assert stamped.epoch == 9
    assert ForwardResponse(outputs, epoch=9).wire_bytes() == ForwardResponse(outputs).wire_bytes()
    echoed = decode(encode(BackwardRequest(1, outputs, outputs, epoch=stamped.epoch)))
    assert echoed.epoch == 9


def test_shapes_whose_strides_overflow_are_refused_by_name():
    for tag, body in (("__tensor__", ["float32", [0, 2**62, 2**62], b""]), ("__spec__", ["float32", [2**40, 2**40]]),
                      ("__spec__", ["float32", [1] * 9])):
        with pytest.raises(WireError, match="is too large"):
            decode(_document({"stage": 0, "inputs": {tag: body}, "token_ids": None, "targets": None}))


def test_zero_dimensional_tensors_round_trip():
    for value in (torch.tensor(1.5), torch.tensor(3, dtype=torch.int64), torch.tensor(2.0, dtype=torch.bfloat16)):
        back = decode(encode(ForwardRequest(0, value))).inputs
        assert back.shape == () and back.dtype == value.dtype and torch.equal(back, value)


def test_the_request_id_and_accumulate_flag_travel_and_cost_no_bytes():
    inputs = torch.randn(2, 3, 4)
    request = BackwardRequest(1, inputs, inputs, epoch=3, request_id=2**31, accumulate=False)
    back = decode(encode(request))
    assert (back.request_id, back.accumulate) == (2**31, False)
    assert request.wire_bytes() == BackwardRequest(1, inputs, inputs).wire_bytes()
    tail = decode(encode(TailRequest(2, inputs, torch.zeros(2, 3, dtype=torch.int64), request_id=7)))
    assert (tail.request_id, tail.accumulate) == (7, True)
