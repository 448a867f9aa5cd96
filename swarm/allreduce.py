"""In-stage all-reduce on hivemind's own butterfly implementation (``swarm.all_reduce=hivemind``).

The protocol decides *when* a stage averages and *who* is in the group (``StageServer``: progress in
the DHT, matchmaking by DHT registration); this module only replaces the group all-reduce itself with
``hivemind.averaging.allreduce.AllReduceRunner``, the runner inside hivemind's
``DecentralizedAverager`` (reduce-scatter + all-gather in parts proportional to each member's
bandwidth, or equal with ``averaging.part_sizes=equal``; streaming; senders and reducers that vanish
are banned after their timeout and their parts keep local values). It implements the protocol's ``Averager``, its rule for bad parts
included, so ``StageServer`` (and the protocol's PowerSGD, whose two phases are all-reduces) use it
unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES, AllreduceException
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter

from node0sim.protocol.averaging import MAX_EARLY_ROUNDS, Averager, AveragingConfig
from node0sim.protocol.messages import GATHER_PART, REDUCE_PART
from swarm.runtime import LiveRuntime

log = logging.getLogger(__name__)

NAMESPACE = "node0sim.allreduce"
MIN_PART_BYTES = 4096
EARLY_STREAM_WAIT_S = 10.0
"""How long a part that arrives before this peer has started the same round waits for it."""


class AllReduceRouter(ServicerBase):
    """Hands each incoming ``rpc_aggregate_part`` stream to the runner of its group (one per peer).

    A stream for a group this peer has not started waits for it (up to ``EARLY_STREAM_WAIT_S``), as the protocol
    all-reduce keeps early parts: only from a member named in the group id, and for at most ``MAX_EARLY_ROUNDS``
    such groups at once; anything else is refused at once with ``BAD_GROUP_ID`` and leaves no state behind.
    """

    def __init__(self) -> None:
        self._runners: dict[bytes, asyncio.Future] = {}

    def _slot(self, group_id: bytes) -> asyncio.Future:
        if group_id not in self._runners:
            self._runners[group_id] = asyncio.get_running_loop().create_future()
        return self._runners[group_id]

    def register(self, group_id: bytes, runner: AllReduceRunner) -> None:
        """Make ``runner`` receive the parts sent for ``group_id``."""
        slot = self._slot(group_id)
        if not slot.done():
            slot.set_result(runner)

    def forget(self, group_id: bytes) -> None:
        """The round is over: later parts for it are refused."""
        self._runners.pop(group_id, None)

    def _may_wait(self, group_id: bytes, sender: str) -> bool:
        """Whether a stream from ``sender`` for ``group_id`` gets a slot: a started group's, or an early one's."""
        if group_id in self._runners:
            return True
        members = group_id.decode(errors="replace").rpartition("/")[2].split(",")
        early = sum(not slot.done() for slot in self._runners.values())
        return sender in members and early < MAX_EARLY_ROUNDS

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        request = await anext(stream)
        if not self._may_wait(request.group_id, context.remote_id.to_base58()):
            log.debug("refused an all-reduce stream from %s for group %r", context.remote_id, request.group_id[:200])
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        slot = self._slot(request.group_id)
        try:
            runner = await asyncio.wait_for(asyncio.shield(slot), EARLY_STREAM_WAIT_S)
        except asyncio.TimeoutError:
            self._runners.pop(request.group_id, None)
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        async for message in runner.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message


async def install(rt: LiveRuntime) -> AllReduceRouter:
    """Serve hivemind all-reduce streams on this peer (before its first round: groupmates may send early)."""
    if rt.all_reduce_router is None:
        router = AllReduceRouter()
        await router.add_p2p_handlers(rt.p2p, namespace=NAMESPACE)
        rt.all_reduce_router = router
    return rt.all_reduce_router


class _CountingRunner(AllReduceRunner):
    """``AllReduceRunner`` that adds the bytes it sends to ``sent_bytes`` under the protocol averager's method
    names: parts for their reducers as ``reduce_part``, averaged parts sent back as ``gather_part``."""

    def __init__(self, *, sent_bytes: dict[str, int], **kwargs: Any):
        super().__init__(**kwargs)
        self.sent_bytes = sent_bytes

    def _count(self, method: str, message: averaging_pb2.AveragingData) -> None:
        self.sent_bytes[method] = self.sent_bytes.get(method, 0) + message.ByteSize()

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            self._count(REDUCE_PART, message)
            yield message

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super().rpc_aggregate_part(stream, context):
            self._count(GATHER_PART, message)
            yield message


class _Runner(_CountingRunner):
    """The counting runner with the :class:`Averager` rule for a member's part that is not finite: the
    part's owner refuses it by banning the sender (hivemind streams a part in chunks: chunks averaged
    before the bad one stay averaged, the sender's contribution is left out from it on)."""

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int):
        async for reply in super()._accumulate_parts_streaming(_finite_parts(stream), sender_index):
            yield reply


async def _finite_parts(stream: AsyncIterator[averaging_pb2.AveragingData]) -> AsyncIterator[averaging_pb2.AveragingData]:
    async for message in stream:
        if not torch.isfinite(deserialize_torch_tensor(message.tensor_part)).all():
            raise AllreduceException("an all-reduce part is not finite")
        yield message


class HivemindGroupAverager(Averager):
    """The :class:`Averager` of a live peer that runs hivemind's AllReduceRunner (drop-in for ``GroupAverager``); what it
    sends is counted in ``rt.sent_bytes`` under the protocol averager's method names (``averaging_bytes``)."""

    _runner_type: type[_CountingRunner] = _Runner

    def __init__(self, rt: LiveRuntime, stage: int, cfg: AveragingConfig):
        self.rt = rt
        self.stage = stage
        self.cfg = cfg
        self.timeouts = 0

    def serve(self) -> None:
        """Check that this peer serves all-reduce streams (:func:`install`)."""
        if self.rt.all_reduce_router is None:
            raise RuntimeError("swarm.allreduce.install(runtime) must run before a HivemindGroupAverager serves")

    async def all_reduce(
        self, tag: str, members: list[str], bandwidths: list[float], vector: torch.Tensor, weight: float
    ) -> tuple[torch.Tensor | None, int]:
        """Weighted average ``sum(vector_i) / sum(weight_i)`` over ``members`` (``vector``: this peer's
        weighted sum), as :meth:`Averager.all_reduce` says."""
        if not torch.isfinite(vector).all():
            vector, weight = torch.zeros_like(vector), 0.0
        return await self._all_reduce(tag, members, bandwidths, vector, weight)

    async def _all_reduce(
        self, tag: str, members: list[str], bandwidths: list[float], vector: torch.Tensor, weight: float
    ) -> tuple[torch.Tensor | None, int]:
        if len(members) == 1:
            return (vector / weight if weight > 0 else None), 1
        router = self.rt.all_reduce_router
        local = vector / weight if weight > 0 else torch.zeros_like(vector)
        group_id = f"{self.stage}/{tag}/{','.join(members)}".encode()
        shares = self.cfg.part_shares(bandwidths)
        total = sum(shares)
        runner = self._runner_type(
            sent_bytes=self.rt.sent_bytes,
            p2p=self.rt.p2p, servicer_type=AllReduceRouter, prefix=NAMESPACE, group_id=group_id, tensors=[local.clone()],
            weight=float(weight), ordered_peer_ids=[PeerID.from_base58(m) for m in members],
            peer_fractions=tuple(b / total for b in shares),
            sender_timeout=self.cfg.averaging_timeout_s / 2, reducer_timeout=self.cfg.averaging_timeout_s,
            part_size_bytes=_part_size(local, len(members)),
        )
        router.register(group_id, runner)
        try:
            deltas = await asyncio.wait_for(_collect(runner), self.cfg.averaging_timeout_s * 1.5)
            result = local + deltas[0]
        except Exception as error:  # a round that fails as a whole keeps the local values
            log.warning("all-reduce %s of stage %d failed (%s): keeping local gradients", tag, self.stage, error)
            self.timeouts += 1
            return (local if weight > 0 else None), 1
        finally:
            router.forget(group_id)
        if runner.banned_senders or runner.tensor_part_container.failed_size:
            self.timeouts += 1
        contributors = len(runner.sender_peer_ids) - len(runner.banned_senders)
        return (None if not torch.isfinite(result).all() else result), contributors



def _part_size(vector: torch.Tensor, group_size: int) -> int:
    """Streaming part size: hivemind's 512 KB default, smaller for small vectors so that every member
    owns some parts (parts are dealt out whole, in proportion to bandwidth)."""
    return max(MIN_PART_BYTES, min(DEFAULT_PART_SIZE_BYTES, vector.numel() * vector.element_size() // (4 * group_size)))


async def _collect(runner: AllReduceRunner) -> list[torch.Tensor]:
    return [delta async for delta in runner]
