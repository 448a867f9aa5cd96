"""The SimPy backend of the runtime interface: async protocol code on virtual time.

Each protocol coroutine is driven by one SimPy process: the coroutine awaits runtime
awaitables, which yield SimPy events; the driver hands each event to SimPy and sends its
value (or throws its failure) back into the coroutine (:func:`_drive`).
"""

from __future__ import annotations

import gc
import random
import types
from typing import Any, Callable, Coroutine, Generator, TypeVar

import simpy

from node0sim.model.costs import ComputeCost
from node0sim.runtime import Future, Handler, Message, PeerCrashed, RemoteError, RequestTimeout, RPCError, Runtime, Task
from node0sim.sim.gpus import ComputeModel, FlatCompute, GPUProfile
from node0sim.sim.network import Endpoint, Network, TcpModel
from node0sim.sim.timers import TimerHeap

T = TypeVar("T")

ERROR_REPLY_BYTES = 64
"""Size of the short error message a peer sends back when it rejects a request."""


class _Cancelled(PeerCrashed):
    """Thrown into a task cancelled by its owner (the caller gave up on an RPC, ...)."""


_CRASH = "crash"
_CANCEL = "cancel"


class _Call:
    """One RPC in flight: its caller process, its delivery process and its deadline.

    ``pending`` is true while the caller still awaits the reply; the simulation's deadline timer
    interrupts the caller with this record as the cause once ``deadline`` passes.
    """

    __slots__ = ("caller", "delivery", "deadline", "pending", "in_handler", "abandoned", "method", "peer", "timeout")

    def __init__(self, caller: simpy.Process, method: str, peer: str, timeout: float, deadline: float):
        self.caller = caller
        self.delivery: simpy.Process | None = None
        self.method = method
        self.peer = peer
        self.timeout = timeout
        self.deadline = deadline
        self.pending = True
        self.in_handler = False
        """The destination is running the handler (inline in the delivery process)."""
        self.abandoned = False
        """The caller gave up while the handler ran: the reply is not sent."""

    def timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"{self.method} to peer {self.peer} got no response within {self.timeout:g} s")


@types.coroutine
def wait(event: simpy.Event) -> Generator[simpy.Event, Any, Any]:
    """Await a SimPy event from protocol-side coroutine code."""
    return (yield event)


def _drive(coro: Coroutine[Any, Any, T]) -> Generator[simpy.Event, Any, T | None]:
    """SimPy process body running ``coro``; a crash or cancel ends it quietly."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            event = coro.throw(error) if error is not None else coro.send(value)
        except StopIteration as stop:
            return stop.value
        except PeerCrashed:
            return None
        if not isinstance(event, simpy.Event):
            coro.close()
            raise TypeError(f"protocol code awaited {event!r}; only runtime awaitables work on the simulator")
        while True:
            try:
                value, error = (yield event), None
            except simpy.Interrupt as interrupt:
                cause = interrupt.cause
                if cause.__class__ is _Call:
                    if not (cause.pending and cause.delivery is event):
                        continue  # a deadline that no longer concerns this wait (the call ended at this instant)
                    value, error = None, cause.timed_out()
                else:
                    value, error = None, (_Cancelled() if cause == _CANCEL else PeerCrashed())
            except GeneratorExit:  # the simulation ended with this task still waiting
                coro.close()
                raise
            except BaseException as failure:  # a failed event: raise it inside the coroutine
                value, error = None, failure
            break


class SimTask(Task):
    """A coroutine running as a SimPy process owned by one peer."""

    def __init__(self, process: simpy.Process):
        self.process = process

    def join(self) -> Any:
        return wait(self.process)

    def cancel(self) -> None:
        if self.process.is_alive and self.process is not self.process.env.active_process:
            self.process.interrupt(_CANCEL)

    @property
    def done(self) -> bool:
        return not self.process.is_alive


class SimFuture(Future):
    """A future backed by a SimPy event."""

    def __init__(self, env: simpy.Environment):
        self._env = env
        self._event = env.event()

    def set_result(self, value: Any) -> None:
        if not self._event.triggered:
            self._event.succeed(value)

    @property
    def done(self) -> bool:
        return self._event.triggered

    async def wait(self, timeout: float | None = None) -> Any:
        if timeout is None or self._event.triggered:
            return await wait(self._event)
        await wait(self._env.any_of([self._event, self._env.timeout(timeout)]))
        if not self._event.triggered:
            raise TimeoutError(f"no result within {timeout:g} s")
        return self._event.value


class EmulatedDHT:
    """A global key-value store with expiry, standing in for a Kademlia DHT.

    Every get/store costs ``lookup_latency_s`` of virtual time (a DHT lookup is a few
    sequential hops; the value is a configuration knob rather than a modelled route).
    """

    def __init__(self, lookup_latency_s: float):
        self.lookup_latency_s = lookup_latency_s
        self._records: dict[str, dict[str | None, tuple[Any, float]]] = {}
        self._views: dict[str, tuple[Any, float]] = {}
        """Per key, the last answer of :meth:`get` and until when it stands (the earliest expiry among its values):
        a stage's records are read far more often than written, and readers treat answers as read-only."""

    def store(self, key: str, subkey: str | None, value: Any, expires_at: float) -> None:
        """Write a value (or a subkey of a dictionary record); a ``None`` value withdraws it."""
        self._views.pop(key, None)
        if value is None:
            self._records.get(key, {}).pop(subkey, None)
        else:
            self._records.setdefault(key, {})[subkey] = (value, expires_at)

    def get(self, key: str, now: float) -> Any:
        """The unexpired value, a ``{subkey: value}`` dict, or None (the same object while nothing changed)."""
        view = self._views.get(key)
        if view is not None and now < view[1]:
            return view[0]
        record = self._records.get(key)
        if not record:
            return None
        live = {sub: value for sub, (value, expires_at) in record.items() if expires_at > now}
        if not live:
            return None
        answer = live[None] if None in live else live
        self._views[key] = (answer, min(record[sub][1] for sub in live))
        return answer


class SimPeer:
    """One virtual machine: a network endpoint, a GPU, RPC handlers and its running tasks."""

    def __init__(
        self, sim: "Simulation", peer_id: str, endpoint: Endpoint, gpu: GPUProfile, compute_model: ComputeModel,
        call_overhead_s: float = 0.0,
    ):
        self.sim = sim
        self.peer_id = peer_id
        self.endpoint = endpoint
        self.gpu = gpu
        self.compute_model = compute_model
        """Seconds of each call's work (see :mod:`node0sim.sim.gpus`)."""
        self.flops_per_s = compute_model.flops_per_s
        self.call_overhead_s = call_overhead_s
        """Fixed time of every accelerator call that does work (see :mod:`node0sim.sim.gpus`)."""
        self.accelerator_busy = False
        self.accelerator_waiters: list[simpy.Event] = []
        """Grants (FIFO) of compute calls waiting for the accelerator; a free one is taken without an event."""
        self.handlers: dict[str, Handler] = {}
        self.tasks: dict[simpy.Process, None] = {}
        self.alive = True
        self.reset_connections = False
        self.busy_s = 0.0
        self.runtime = SimRuntime(self)

    def crash(self, reset_connections: bool = False) -> None:
        """Leave without goodbye: every task of this peer stops. Calls to it time out (the host vanished), or with
        ``reset_connections`` (its process was killed while its host's kernel still answers: a closed socket, a
        refused dial) fail with a plain :class:`RPCError` once the reset has crossed the network."""
        self.alive = False
        self.reset_connections = reset_connections
        self.handlers.clear()
        for process in list(self.tasks):
            if process.is_alive and process is not self.sim.env.active_process:
                process.interrupt(_CRASH)


class SimRuntime(Runtime):
    """The runtime interface for one simulated peer."""

    def __init__(self, peer: SimPeer):
        self.peer = peer
        self.peer_id = peer.peer_id
        self._sim = peer.sim
        self._env = peer.sim.env

    def now(self) -> float:
        return self._env.now

    async def sleep(self, seconds: float) -> None:
        await wait(self._env.timeout(seconds))

    async def compute(self, cost: ComputeCost | float, fn: Callable[[], T] | None = None) -> T | None:
        peer = self.peer
        if peer.accelerator_busy:
            grant = self._env.event()
            peer.accelerator_waiters.append(grant)
            try:
                await wait(grant)
            except BaseException:
                if grant.triggered:
                    self._release()  # granted at this instant, but the task stopped first
                else:
                    peer.accelerator_waiters.remove(grant)
                raise
        else:
            peer.accelerator_busy = True
        try:
            result = fn() if fn is not None else None
            seconds = self._seconds(cost)
            peer.busy_s += seconds
            await wait(self._env.timeout(seconds))
            return result
        finally:
            self._release()

    def _seconds(self, cost: ComputeCost | float) -> float:
        """Time of one call: its work by the peer's compute model (plain FLOPs at its announced rate), plus the
        call overhead if it does any work."""
        peer = self.peer
        if isinstance(cost, ComputeCost):
            work = cost.flops > 0 or cost.elementwise_bytes > 0
            seconds = peer.compute_model.seconds(cost)
        else:
            work, seconds = cost > 0, cost / peer.flops_per_s
        return seconds + (peer.call_overhead_s if work else 0.0)

    def _release(self) -> None:
        """Hand the accelerator to the oldest waiter (granted at this instant), or mark it free."""
        waiters = self.peer.accelerator_waiters
        if waiters:
            waiters.pop(0).succeed()
        else:
            self.peer.accelerator_busy = False

    async def call(self, peer: str, method: str, request: Message, timeout: float) -> Any:
        size = request.wire_bytes()
        if size > self._sim.max_message_bytes:
            raise ValueError(
                f"{method} request to {peer} is {size} bytes, over the {self._sim.max_message_bytes}-byte message limit"
            )
        sim = self._sim
        record = _Call(self._env.active_process, method, peer, timeout, self._env.now + timeout)
        delivery = record.delivery = sim.start(self.peer, sim.deliver(self.peer, peer, method, request, record))
        sim._watch_deadline(record)
        try:
            return await wait(delivery)
        except (RequestTimeout, _Cancelled):  # the caller gave up, or its task was cancelled (a hedge's loser)
            if delivery.is_alive:
                if record.in_handler:
                    record.abandoned = True  # the handler runs on; its reply is dropped
                else:
                    delivery.interrupt(_CANCEL)
            raise
        finally:
            if record.pending:
                record.pending = False
                if delivery.is_alive:
                    delivery.defused = True  # nobody listens to it any more

    def serve(self, method: str, handler: Handler) -> None:
        self.peer.handlers[method] = handler

    async def dht_store(self, key: str, value: Any, expires_in: float, per_peer: bool = False) -> None:
        await wait(self._env.timeout(self._sim.dht.lookup_latency_s))
        self._sim.dht.store(key, self.peer_id if per_peer else None, value, self._env.now + expires_in)

    async def dht_get(self, key: str) -> Any:
        await wait(self._env.timeout(self._sim.dht.lookup_latency_s))
        return self._sim.dht.get(key, self._env.now)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Task:
        return SimTask(self._sim.start(self.peer, coro))

    def future(self) -> Future:
        return SimFuture(self._env)

    async def gather(self, tasks: list[Task]) -> list[Any]:
        return [await task.join() for task in tasks]


def _interrupt_caller(call: _Call) -> None:
    """The deadline of a call still awaited passed: its caller gets a :class:`RequestTimeout`."""
    call.caller.interrupt(call)


PAIR_STREAMS = ("shared", "serial")
"""``sim.pair_streams``: how messages between the same two peers travel (``SimConfig``)."""


class Simulation:
    """A SimPy environment with peers, a network, an emulated DHT and a seeded RNG."""

    def __init__(
        self,
        *,
        seed: int,
        latency_s: Callable[[str, str], float],
        jitter_s: float = 0.0,
        dht_latency_s: float = 0.05,
        max_message_bytes: int = 2**31,
        link_sharing: str = "maxmin",
        transport: TcpModel | None = None,
        rpc_overhead_s: float = 0.0,
        pair_streams: str = "shared",
    ):
        self.env = simpy.Environment()
        self.rng = random.Random(seed)
        self.network = Network(self.env, latency_s, jitter_s, random.Random(self.rng.getrandbits(64)), link_sharing, transport)
        self.rpc_overhead_s = rpc_overhead_s
        self._pair_streams: dict[tuple[str, str], simpy.Resource] | None = {} if pair_streams == "serial" else None
        """``sim.pair_streams=serial``: one stream per direction of each pair of peers, held by one message at a time."""
        """Fixed time of every RPC outside the links (event loops, daemon hops, stream open): see ``sim.tcp_rpc_overhead_ms``."""
        self.dht = EmulatedDHT(dht_latency_s)
        self.max_message_bytes = max_message_bytes
        self.peers: dict[str, SimPeer] = {}
        self.traffic: dict[str, int] = {}
        """Bytes of requests and responses per RPC method."""
        # RPC deadlines of calls still awaited; the timer fires at each deadline itself (a delay from now could round it)
        self._deadlines: TimerHeap[_Call] = TimerHeap(self.env, lambda call, _tag: call.pending, _interrupt_caller)

    def add_peer(
        self, peer_id: str, *, region: str, up_mbps: float, down_mbps: float, gpu: GPUProfile, utilization: float = 1.0,
        call_overhead_s: float = 0.0, compute_model: ComputeModel | None = None,
    ) -> SimPeer:
        """Create a peer; its ``runtime`` is what protocol roles receive. Without a ``compute_model``, every FLOP
        runs at the GPU's 16-bit peak x ``utilization`` (the flat model)."""
        if peer_id in self.peers and self.peers[peer_id].alive:
            raise ValueError(f"peer {peer_id} already exists")
        endpoint = Endpoint(peer_id, region, up_mbps, down_mbps)
        model = compute_model if compute_model is not None else FlatCompute(gpu.peak_flops * utilization)
        peer = SimPeer(self, peer_id, endpoint, gpu, model, call_overhead_s)
        self.peers[peer_id] = peer
        return peer

    def start(self, owner: SimPeer, coro: Coroutine[Any, Any, Any]) -> simpy.Process:
        """Run ``coro`` as a process that ends when ``owner`` crashes."""
        process = self.env.process(_drive(coro))
        owner.tasks[process] = None
        process.callbacks.append(lambda _event: owner.tasks.pop(process, None))
        return process

    async def deliver(self, src: SimPeer, dst_id: str, method: str, request: Message, call: _Call) -> Any:
        """One RPC: request bytes, the handler on the destination, response bytes.

        A destination that is gone (or crashes before answering) never replies, so the caller's
        timeout fires, as on a real network. An id that no peer ever had fails after one DHT lookup with a plain
        :class:`RPCError`: the dial's peer lookup finds no address (p2pd's "routing: not found", 1-2 ms on loopback,
        ``tools/bench_swarm.py dial``). A handler's exception reaches the caller as
        :meth:`Runtime.call` says; a bug then also fails an event nobody defuses, so that
        ``Simulation.run`` raises it once the caller has its reply. The handler runs inline in this (delivery) process,
        which meanwhile is a task of the destination instead of the source: a crash of the
        destination stops the handler, while a crash of the source, or the caller giving up, lets
        it finish and only drops its reply.
        """
        dst = self.peers.get(dst_id)
        if dst is None:  # no peer ever had this id: the dial's peer lookup finds no address, as p2pd's "routing: not found"
            await wait(self.env.timeout(self.dht.lookup_latency_s))
            raise RPCError(f"peer {dst_id}: no address found (no such peer)")
        if not dst.alive:
            await self._dead_end(src, dst, round_trips=1.0)  # a dial to it
        if self.rpc_overhead_s > 0:
            await wait(self.env.timeout(self.rpc_overhead_s))
        await self._send(src, dst, request.wire_bytes(), method)
        handler = dst.handlers.get(method) if dst.alive else None
        if handler is None:
            if not dst.alive:
                await self._dead_end(src, dst, round_trips=0.5)  # the reset coming back
            await self._send(dst, src, ERROR_REPLY_BYTES, method)
            raise RemoteError(f"peer {dst_id} does not serve {method!r}")
        process = self.env.active_process
        del src.tasks[process]
        dst.tasks[process] = None
        call.in_handler = True
        rejected: str | None = None
        try:
            response = await handler(src.peer_id, request)
        except (ValueError, RPCError) as error:
            rejected = str(error)
        except PeerCrashed:  # the destination crashed mid-request
            await self._dead_end(src, dst, round_trips=0.5)
        except Exception as bug:  # the caller is told, then the simulation stops with the bug
            rejected = f"internal error in {method}: {type(bug).__name__}"
            self.env.active_process.callbacks.append(lambda _delivered, bug=bug: self.env.event().fail(bug))
        finally:
            call.in_handler = False
            dst.tasks.pop(process, None)
        if call.abandoned or not src.alive:
            return None  # the caller is gone: the destination's reply goes nowhere
        src.tasks[process] = None
        if rejected is not None:
            await self._send(dst, src, ERROR_REPLY_BYTES, method)
            raise RemoteError(f"peer {dst_id} rejected {method}: {rejected}") from None
        if not dst.alive:
            await self._dead_end(src, dst, round_trips=0.5)
        await self._send(dst, src, response.wire_bytes(), method)
        return response

    async def _dead_end(self, src: SimPeer, dst: SimPeer, round_trips: float) -> None:
        """A call that reached a dead peer: it never returns (the caller's timeout ends it), unless the peer's process
        was killed on a live host, whose reset reaches the caller after ``round_trips`` round trips."""
        if not dst.reset_connections:
            await wait(self.env.event())
        await wait(self.env.timeout(round_trips * self.network.round_trip(src.endpoint, dst.endpoint)))
        raise RPCError(f"peer {dst.peer_id}: connection reset (its process was killed)")  # not refused: it may have run

    def _watch_deadline(self, call: _Call) -> None:
        self._deadlines.push(call.deadline, call)
        self._deadlines.arm()

    async def _send(self, src: SimPeer, dst: SimPeer, nbytes: int, method: str) -> None:
        if self._pair_streams is None:
            return await self._transfer(src, dst, nbytes, method)
        stream = self._pair_streams.get((src.peer_id, dst.peer_id))
        if stream is None:
            stream = self._pair_streams[(src.peer_id, dst.peer_id)] = simpy.Resource(self.env, capacity=1)
        with stream.request() as turn:  # released (or left) however the send ends: crash, cancel, timeout
            await wait(turn)
            await self._transfer(src, dst, nbytes, method)

    async def _transfer(self, src: SimPeer, dst: SimPeer, nbytes: int, method: str) -> None:
        self.traffic[method] = self.traffic.get(method, 0) + nbytes
        flow = self.network.transfer(src.endpoint, dst.endpoint, nbytes)
        try:
            await wait(flow.done)
        except PeerCrashed:
            self.network.abort(flow)
            raise

    def run(self, until: float | None = None) -> None:
        """Advance virtual time until ``until`` (or until nothing is left to do).

        The simulation allocates millions of short-lived objects; Python's default cyclic GC
        thresholds make it scan the young generation every 700 allocations (about a third of the
        wall time of a large run), so they are raised while the simulation runs. Results do not change.
        """
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], 50_000), max(thresholds[1], 50), max(thresholds[2], 100))
        try:
            self.env.run(until=until)
        finally:
            gc.set_threshold(*thresholds)
