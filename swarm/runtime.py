"""The hivemind backend of the runtime interface: protocol coroutines on a real asyncio loop.

One :class:`LiveRuntime` per process. It owns
- a libp2p daemon (``hivemind.p2p.P2P``, i.e. ``p2pd``) for RPC: one binary stream handler
  (``node0sim.rpc``) carries every protocol method, messages encoded by :mod:`swarm.wire`;
- a Kademlia DHT node (``hivemind.dht.DHTNode``) in the same event loop, with hivemind's RSA
  signature validator and :class:`SubkeyValidator`: the run configuration is signed by the organizer,
  and a peer's own entry of a dictionary record (``per_peer``) is signed by the key its peer id is the
  hash of, so no peer can write, overwrite or withdraw another's;
- admission (``swarm.admission=token``, :mod:`swarm.admission`): once :meth:`LiveRuntime.admit` is called, every
  call carries this peer's token, calls from peers without a valid one are refused, and dictionary-record entries
  carry the writer's token and are dropped by readers when it does not admit their owner;
- one "accelerator" thread: ``compute`` runs the stage's tensor work there, one call at a
  time like the simulator's GPU queue, so the event loop keeps serving RPCs meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Callable, Coroutine, TypeVar

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError
from hivemind.utils import MSGPackSerializer, get_dht_time

from node0sim.model.costs import ComputeCost
from node0sim.runtime import Future, Handler, Message, RemoteError, RequestTimeout, RPCError, Runtime, Task
from swarm import wire
from swarm.admission import MAX_TOKEN_BYTES, Admission, AdmissionError
from swarm.lifecycle import rsa_peer_id

T = TypeVar("T")
log = logging.getLogger(__name__)

RPC_PROTOCOL = "node0sim.rpc"
"""The libp2p protocol id of the single stream handler that dispatches every method."""

MAX_METHOD_BYTES = 64
REPLY_LINGER_S = 30.0
"""How long a server keeps a stream open after its reply, waiting for the caller to close it first (below)."""
_OK, _ERROR = b"\x00", b"\x01"
ADMISSION_FIELD, VALUE_FIELD = "admission", "value"
"""An entry of a dictionary record in an admission run: the writer's token and what it stored."""
_LENGTH_BYTES = 8


OWNER_MARKER_START = RSASignatureValidator.PUBLIC_KEY_FORMAT.split(b"_key_")[0]
"""``[owner:``: what hivemind's signature validator looks for in a key or subkey to require the owner's signature."""


def subkey_owner(subkey: Any) -> str | None:
    """The peer whose own entry ``subkey`` is: for ``b"<peer id>[owner:<RSA public key>]"`` where the peer id is
    that key's (the signature validator makes sure the entry was signed with it); otherwise None."""
    return _owner(subkey) if isinstance(subkey, bytes) else None


@functools.lru_cache(maxsize=4096)
def _owner(subkey: bytes) -> str | None:
    peer_id, marker, rest = subkey.partition(OWNER_MARKER_START)
    if not marker or not rest.endswith(b"]"):
        return None
    try:
        owner = rsa_peer_id(rest[:-1])
    except Exception:  # any bytes can arrive: not a key, or a key type the library refuses
        return None
    return owner if owner.encode() == peer_id else None


class SubkeyValidator(RecordValidatorBase):
    """Accepts a DHT record without subkey, one under an ``[owner:...]`` subkey (the run configuration), or a
    peer's own entry (:func:`subkey_owner`); refuses anything else, so together with the signature validator
    a dictionary entry that names a peer can only come from that peer.

    Refusing subkeys that are not bytes also keeps out a hivemind 1.1.12 bug (seen here): a str subkey and a
    bytes one with the same expiration in one record make its storage's heap compare them, the TypeError
    escapes inside the DHT's search, and every later get of that key hangs."""

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey == DHTProtocol.IS_REGULAR_VALUE:
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # bytes from the network
            return False
        return isinstance(subkey, bytes) and (subkey.startswith(OWNER_MARKER_START) or subkey_owner(subkey) is not None)


class LiveTask(Task):
    """An asyncio task; a failure nobody joins is logged and kept in ``runtime.errors``."""

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.joined = False

    async def join(self) -> Any:
        self.joined = True
        return await self.task

    def cancel(self) -> None:
        self.task.cancel()

    @property
    def done(self) -> bool:
        return self.task.done()


class LiveFuture(Future):
    """An asyncio future."""

    def __init__(self) -> None:
        self._future: asyncio.Future = asyncio.get_running_loop().create_future()

    def set_result(self, value: Any) -> None:
        if not self._future.done():
            self._future.set_result(value)

    @property
    def done(self) -> bool:
        return self._future.done()

    async def wait(self, timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no result within {timeout:g} s") from None


class LiveRuntime(Runtime):
    """The runtime interface for one live peer (see the module docstring)."""

    def __init__(self, p2p: P2P, dht: DHTNode, owner_marker: bytes, max_message_bytes: int,
                 injected_latency_s: float = 0.0):
        self.p2p = p2p
        self.dht = dht
        self.peer_id = p2p.peer_id.to_base58()
        self._own_subkey = self.peer_id.encode() + owner_marker
        """This peer's entry of dictionary records: its id and the ``[owner:...]`` marker of the key that signs."""
        self.max_message_bytes = max_message_bytes
        self.injected_latency_s = injected_latency_s
        """Software-injected one-way delay before each RPC message this peer writes (``swarm.injected_latency_ms``)."""
        self.errors: list[BaseException] = []
        """Failures of spawned tasks that nobody joined, and bugs of handlers (logged when they happen)."""
        self.handled: dict[str, int] = {}
        """Requests this peer answered, per method."""
        self.sent_bytes: dict[str, int] = {}
        """Message bytes this peer sent (its requests and its responses), per method."""
        self.received_bytes: dict[str, int] = {}
        """Message bytes this peer received (requests to it and responses to its calls), per method."""
        self.response_bytes: dict[str, int] = {}
        """Bytes of the responses to this peer's own calls, per method (e.g. state it downloaded)."""
        self.all_reduce_router: Any = None
        """hivemind's all-reduce stream router, when ``swarm.all_reduce=hivemind`` (``swarm.allreduce``)."""
        self._handlers: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task] = set()
        self._accelerator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accelerator")
        self._last_expiration: dict[tuple[str, bool], float] = {}
        self.admission: Admission | None = None
        """The run's admission rule once :meth:`admit` was called (``swarm.admission=token``); None: anyone may call."""
        self.own_token = b""
        """This peer's admission token, sent with every call and record entry (empty in an open run)."""
        self.request_idle_s: float | None = None
        """A request whose bytes stop arriving for this long is dropped (the roles set ``train.request_timeout_s``:
        an honest caller closes its stream when its call times out, so only a stalled or hostile one is idle longer;
        None: wait for ever)."""
        self.refused_peers: set[str] = set()
        """Peers whose calls or record entries were refused for want of a valid token (each logged once)."""
        self.max_calls_per_caller: int | None = None
        """A caller's calls beyond this many open at once are refused before their request is read (the roles set
        ``assembly.calls_per_caller``: what the run's schedule lets an honest peer have open; None: no cap)."""
        self.refused_calls = 0
        """Calls refused by that cap."""
        self._open_calls: dict[str, int] = {}

    def admit(self, admission: Admission, own_token: bytes) -> None:
        """From now on, refuse calls and drop record entries of peers without a token that ``admission`` accepts, and
        send ``own_token`` with this peer's own calls and entries."""
        self.admission, self.own_token = admission, own_token

    async def start(self) -> None:
        """Register the RPC stream handler."""
        await self.p2p.add_binary_stream_handler(RPC_PROTOCOL, self._handle_stream)

    async def close(self) -> None:
        """Cancel this peer's tasks and stop the accelerator thread."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._accelerator.shutdown(wait=True, cancel_futures=True)

    # ---- time, compute, concurrency --------------------------------------------------------
    def now(self) -> float:
        # DHT time (wall clock): peers compare each other's report times, so it must be shared
        return get_dht_time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def compute(self, cost: ComputeCost | float, fn: Callable[[], T] | None = None) -> T | None:
        if fn is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(self._accelerator, fn)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Task:
        task = LiveTask(asyncio.get_running_loop().create_task(coro))
        self._tasks.add(task.task)
        task.task.add_done_callback(lambda t: self._task_done(task, t))
        return task

    def _task_done(self, task: LiveTask, finished: asyncio.Task) -> None:
        self._tasks.discard(finished)
        if finished.cancelled() or task.joined or finished.exception() is None:
            return
        error = finished.exception()
        self.errors.append(error)
        log.error("a protocol task failed", exc_info=error)

    def future(self) -> Future:
        return LiveFuture()

    async def gather(self, tasks: list[Task]) -> list[Any]:
        return list(await asyncio.gather(*(task.join() for task in tasks)))

    # ---- DHT -------------------------------------------------------------------------------
    async def dht_store(self, key: str, value: Any, expires_in: float, per_peer: bool = False) -> None:
        # hivemind keeps the record with the latest expiration, while the interface promises that a
        # peer's later store replaces its earlier one (a withdrawal stores None with expires_in=0):
        # so each store of this peer expires strictly later than its previous one for that key
        previous = self._last_expiration.get((key, per_peer), 0.0)
        expiration = max(get_dht_time() + expires_in, previous + 1e-3)
        self._last_expiration[(key, per_peer)] = expiration
        if per_peer and self.admission is not None:
            value = {ADMISSION_FIELD: self.own_token, VALUE_FIELD: value}
        await self.dht.store(key, value, expiration, subkey=self._own_subkey if per_peer else None)

    async def dht_get(self, key: str) -> Any:
        found = await self.dht.get(key, latest=True)
        if found is None:
            return None
        if isinstance(found.value, dict):  # withdrawn subkeys hold None until they expire: they are absent
            now = get_dht_time()
            live = {subkey_owner(sub): item.value for sub, item in found.value.items() if item.expiration_time > now}
            live.pop(None, None)  # None: a key owner's entry (the run configuration), or no peer's
            if self.admission is not None:
                live = {owner: self._admitted_value(key, owner, value, now) for owner, value in live.items()}
            return {owner: value for owner, value in live.items() if value is not None} or None
        return found.value

    def _admitted_value(self, key: str, owner: str, entry: Any, now: float) -> Any:
        """What ``owner`` stored in its entry of ``key`` if the token stored with it admits ``owner``; else None."""
        if not (isinstance(entry, dict) and entry.keys() == {ADMISSION_FIELD, VALUE_FIELD}):
            return self._refuse(owner, f"its entry of {key} carries no admission token")
        token = entry[ADMISSION_FIELD]
        try:
            self.admission.check(token if isinstance(token, bytes) else b"", owner, now)
        except AdmissionError as error:
            return self._refuse(owner, f"its entry of {key} was ignored: {error}")
        return entry[VALUE_FIELD]

    def _refuse(self, peer: str, why: str) -> None:
        """Note a peer refused for admission (logged the first time)."""
        if peer not in self.refused_peers:
            self.refused_peers.add(peer)
            log.warning("peer %s is not admitted to this run: %s", peer, why)
        return None

    # ---- RPC -------------------------------------------------------------------------------
    def sent_bytes_total(self) -> int:
        """All message bytes this peer sent."""
        return sum(self.sent_bytes.values())

    def _count(self, counter: dict[str, int], method: str, amount: int) -> None:
        counter[method] = counter.get(method, 0) + amount

    def serve(self, method: str, handler: Handler) -> None:
        self._handlers[method] = handler

    async def call(self, peer: str, method: str, request: Message, timeout: float) -> Any:
        payload = wire.encode(request)
        if len(payload) > self.max_message_bytes:
            raise ValueError(
                f"{method} request to {peer} is {len(payload)} bytes, over the {self.max_message_bytes}-byte message limit"
            )
        try:
            return await asyncio.wait_for(self._call(peer, method, payload), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"{method} to peer {peer} got no response within {timeout:g} s") from None
        except (P2PDaemonError, ConnectionError, asyncio.IncompleteReadError, OSError) as error:
            raise RPCError(f"{method} to peer {peer} failed: {error or type(error).__name__}") from None

    async def _call(self, peer: str, method: str, payload: bytes) -> Any:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), RPC_PROTOCOL)
        try:
            await self._inject_latency()
            await _write_frames(writer, method.encode(), self.own_token, payload)
            self._count(self.sent_bytes, method, len(payload))
            status = await reader.readexactly(1)
            body = await _read_frame(reader, self.max_message_bytes)
            self._count(self.received_bytes, method, len(body))
            self._count(self.response_bytes, method, len(body))
        finally:
            writer.close()
        if status == _ERROR:
            raise RemoteError(f"peer {peer} rejected {method}: {body.decode(errors='replace')}")
        try:
            return wire.decode(body)
        except wire.WireError as error:
            raise RPCError(f"peer {peer} sent a malformed {method} response: {error}") from None

    async def _handle_stream(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caller = stream_info.peer_id.to_base58()
        open_calls = self._open_calls[caller] = self._open_calls.get(caller, 0) + 1
        try:
            if self.max_calls_per_caller is not None and open_calls > self.max_calls_per_caller:
                self.refused_calls += 1
                if self.refused_calls == 1 or self.refused_calls % 1000 == 0:
                    log.warning("refused a call from %s: it has %d calls open here, the run allows %d per caller (%d refused "
                                "so far)", caller, open_calls - 1, self.max_calls_per_caller, self.refused_calls)
                message = f"too many concurrent calls: {open_calls - 1} open, the run allows {self.max_calls_per_caller} per caller"
                await _write_frames(writer, _ERROR, message.encode(), raw_first=True)
                await _caller_closed(reader)  # closing at once lost the refusal: 5 of 15 runs of its test under load
                return
            method, status, body = await self._respond(caller, reader)
            await self._inject_latency()
            await _write_frames(writer, status, body, raw_first=True)
            self._count(self.sent_bytes, method, len(body))
            await _caller_closed(reader)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as error:
            log.info("lost the connection to %s mid-request: %s", caller, error or type(error).__name__)
        finally:
            writer.close()
            if self._open_calls[caller] == 1:
                del self._open_calls[caller]
            else:
                self._open_calls[caller] -= 1

    async def _inject_latency(self) -> None:
        """Hold a message back by ``injected_latency_s``: propagation delay the lab's kernel cannot add (no netem)."""
        if self.injected_latency_s > 0:
            await asyncio.sleep(self.injected_latency_s)

    async def _respond(self, caller: str, reader: asyncio.StreamReader) -> tuple[str, bytes, bytes]:
        """Read one request, run its handler; (method, status, body) of the reply."""
        method = "?"
        try:
            method = (await _read_frame(reader, MAX_METHOD_BYTES, self.request_idle_s)).decode(errors="replace")
            token = await _read_frame(reader, MAX_TOKEN_BYTES, self.request_idle_s)
            payload = await _read_frame(reader, self.max_message_bytes, self.request_idle_s)
            self._count(self.received_bytes, method, len(payload))
            if self.admission is not None:
                try:
                    self.admission.check(token, caller, self.now())
                except AdmissionError as error:
                    self._refuse(caller, f"its {method} call was refused: {error}")
                    raise RPCError(f"not admitted to run {self.admission.run_id!r}: {error}") from None
            handler = self._handlers.get(method)
            if handler is None:
                raise RemoteError(f"this peer does not serve {method!r}")
            response = wire.encode(await handler(caller, wire.decode(payload)))
            self._count(self.handled, method, 1)
            return method, _OK, response
        except (asyncio.IncompleteReadError, ConnectionError):
            raise
        except (ValueError, RPCError) as rejected:  # includes wire.WireError and oversized messages
            return method, _ERROR, str(rejected).encode()
        except Exception as bug:  # as Runtime.call says: the caller is told, the bug is kept
            log.exception("handler %s failed on a request from %s", method, caller)
            self.errors.append(bug)
            return method, _ERROR, f"internal error in {method}: {type(bug).__name__}".encode()


async def _caller_closed(reader: asyncio.StreamReader) -> None:
    """Wait (at most ``REPLY_LINGER_S``) until the caller, having read the whole reply, closes the stream. Closing it
    here at once lost replies now and then on a loaded machine (0 of 1 or 65,527 of 65,612 bytes read: 4 calls in 24
    runs of the node0_tiny live test). The likely mechanism, read in the daemon's code and not isolated (2,000 calls
    between two peers alone lost none): p2pd's pipe resets a libp2p stream when its other direction errs after one
    side closed (``doStreamPipe``, stream.go of learning-at-home/go-libp2p-daemon), and a reset drops what the
    receiver has not read yet. Once the caller has closed, nothing of the reply is left in flight (a reset that the
    caller's close brings is no loss, so it is not reported as one). What the caller still sends meanwhile (the
    request of a call refused before it was read) is read and dropped."""
    async def end_of_stream() -> None:
        while await reader.read(1 << 16):
            pass

    with suppress(asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(end_of_stream(), REPLY_LINGER_S)


async def _write_frames(writer: asyncio.StreamWriter, first: bytes, *frames: bytes, raw_first: bool = False) -> None:
    """Write ``first`` (as is with ``raw_first``, else length-prefixed) and then each of ``frames`` length-prefixed."""
    writer.write(first if raw_first else len(first).to_bytes(_LENGTH_BYTES, "big") + first)
    for frame in frames:
        writer.write(len(frame).to_bytes(_LENGTH_BYTES, "big"))
        writer.write(frame)
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader, limit: int, idle_s: float | None = None) -> bytes:
    """One length-prefixed frame of at most ``limit`` bytes; with ``idle_s``, :class:`StalledStream` if no byte of it
    arrives for that long (however slowly the bytes come, as long as they come)."""
    length = int.from_bytes(await _read_exactly(reader, _LENGTH_BYTES, idle_s), "big")
    if length > limit:
        raise ValueError(f"message of {length} bytes is over the {limit}-byte limit")
    return await _read_exactly(reader, length, idle_s)


class StalledStream(ConnectionError):
    """A peer stopped sending in the middle of its request."""


async def _read_exactly(reader: asyncio.StreamReader, size: int, idle_s: float | None) -> bytes:
    if idle_s is None:
        return await reader.readexactly(size)
    parts, left = [], size
    while left:
        try:
            chunk = await asyncio.wait_for(reader.read(left), idle_s)
        except asyncio.TimeoutError:
            raise StalledStream(f"no byte for {idle_s:g} s with {left} of {size} bytes still to come") from None
        if not chunk:
            raise asyncio.IncompleteReadError(b"".join(parts), size)
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
