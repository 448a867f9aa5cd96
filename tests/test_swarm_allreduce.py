"""The live all-reduce router (``swarm.all_reduce=hivemind``): what it keeps for streams of groups it has not started."""

import asyncio

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2

from node0sim.protocol.averaging import MAX_EARLY_ROUNDS
from swarm.allreduce import AllReduceRouter

MEMBER = PeerID(b"\x00\x24" + b"m" * 36)
STRANGER = PeerID(b"\x00\x24" + b"s" * 36)


def _group(tag: str, *members: PeerID) -> bytes:
    return f"0/{tag}/{','.join(m.to_base58() for m in members)}".encode()


async def _first_reply(router: AllReduceRouter, group_id: bytes, sender: PeerID) -> asyncio.Task:
    """Open a stream for ``group_id`` from ``sender``; the task ends with the router's first reply (or waits)."""
    async def stream():
        yield averaging_pb2.AveragingData(group_id=group_id)

    context = P2PContext(handle_name="rpc_aggregate_part", local_id=MEMBER, remote_id=sender)
    task = asyncio.ensure_future(router.rpc_aggregate_part(stream(), context).__anext__())
    await asyncio.sleep(0.01)
    return task


def test_streams_of_unstarted_groups_are_kept_only_from_members_and_only_for_a_few_groups():
    async def scenario():
        router = AllReduceRouter()
        stranger = await _first_reply(router, _group("junk", MEMBER), STRANGER)
        assert stranger.done() and stranger.result().code == averaging_pb2.BAD_GROUP_ID
        waiting = [await _first_reply(router, _group(f"round{i}", MEMBER, STRANGER), STRANGER) for i in range(MAX_EARLY_ROUNDS)]
        assert not any(task.done() for task in waiting)  # early parts of a member wait for the round to start
        one_too_many = await _first_reply(router, _group("one-too-many", MEMBER, STRANGER), STRANGER)
        assert one_too_many.done() and one_too_many.result().code == averaging_pb2.BAD_GROUP_ID
        assert len(router._runners) == MAX_EARLY_ROUNDS
        for task in waiting:
            task.cancel()

    asyncio.run(scenario())
