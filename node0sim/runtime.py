"""The runtime interface: everything protocol code may use, and nothing else.

Protocol roles (trainer, stage server, ...) are ``async`` functions that receive a
:class:`Runtime` bound to one peer. They never import a backend and never call ``asyncio``
directly: the SimPy backend (``node0sim.sim``) drives the same coroutines in virtual time,
the hivemind backend (``swarm``) on a real event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Protocol, TypeVar

if TYPE_CHECKING:
    from node0sim.model.costs import ComputeCost

T = TypeVar("T")


class Message(Protocol):
    """Anything sent over RPC: it knows how many bytes it occupies on the wire."""

    def wire_bytes(self) -> int:
        """Size of the serialized message, charged to the network."""


Handler = Callable[[str, Any], Awaitable[Any]]
"""An RPC handler: ``await handler(caller_peer_id, request) -> response``."""


class RPCError(Exception):
    """A remote call did not produce a response."""


class RequestTimeout(RPCError):
    """No response within the call's timeout (the peer may be gone, slow or unreachable)."""


class RemoteError(RPCError):
    """The remote handler rejected the request; the message says why."""


class PeerCrashed(BaseException):
    """Raised inside a peer's own tasks when that peer leaves or crashes.

    A ``BaseException`` (like ``asyncio.CancelledError``) so that ``except Exception`` in
    protocol code does not swallow the end of its own peer.
    """


class Task(ABC):
    """A concurrently running coroutine started with :meth:`Runtime.spawn`."""

    @abstractmethod
    def join(self) -> Awaitable[Any]:
        """Wait for the task and return its result (or raise its exception)."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop the task at its next await."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """Whether the task has finished."""


class Future(ABC):
    """A value one task sets and other tasks await (e.g. "all parts of this all-reduce arrived")."""

    @abstractmethod
    def set_result(self, value: Any) -> None:
        """Resolve the future (once; later calls are ignored)."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """Whether a result was set."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> Awaitable[Any]:
        """The result; raises ``TimeoutError`` if none is set within ``timeout`` seconds."""


class Runtime(ABC):
    """What one peer's protocol code can do: time, compute, RPC, DHT and concurrency."""

    peer_id: str

    @abstractmethod
    def now(self) -> float:
        """Current time in seconds (virtual in simulation, wall-clock in a live swarm)."""

    @abstractmethod
    def sleep(self, seconds: float) -> Awaitable[None]:
        """Wait ``seconds``."""

    @abstractmethod
    def compute(self, cost: ComputeCost | float, fn: Callable[[], T] | None = None) -> Awaitable[T | None]:
        """Run ``fn`` on this peer's accelerator; ``cost`` is its work for the cost model (the operations of a
        :class:`~node0sim.model.costs.ComputeCost`, or plain FLOPs).

        The simulator charges the time its compute model gives ``cost`` (``sim.compute_model``, see
        :mod:`node0sim.sim.gpus`) and runs ``fn`` (if given) for its numerical result; a live backend simply runs ``fn``.
        """

    @abstractmethod
    def call(self, peer: str, method: str, request: Message, timeout: float) -> Awaitable[Any]:
        """Send ``request`` to ``peer``'s handler for ``method`` and return its response.

        What the caller gets, on every backend:

        - the handler's response;
        - :class:`RemoteError` with the handler's message when the handler raised ``ValueError`` (it
          refused a malformed or unacceptable request) or :class:`RPCError` (a call of its own failed),
          and when ``peer`` does not serve ``method``;
        - :class:`RemoteError` naming the exception type when the handler raised anything else: that is a
          bug, which the backend also reports (the simulator raises it from ``Simulation.run``, the live
          backend logs it and keeps it in ``LiveRuntime.errors``);
        - :class:`RequestTimeout` when no response came within ``timeout`` seconds: the peer is slow, gone,
          or crashed mid-request (a handler stopped by its peer's crash never replies);
        - a plain :class:`RPCError`, sooner, when the backend learns that the connection failed: a dial refused,
          no address found for ``peer`` (an id no peer has: after about one DHT lookup), a peer killed mid-request
          (the simulator's ``kill``: its kernel resets the connection), a stream closed before the whole reply came.
          Callers treat every :class:`RPCError` as "no response"; only a :class:`RemoteError` says the handler did
          not run the request through, any other may have run it.

        A request over the backend's message size limit raises ``ValueError`` here, before anything is sent.
        """

    @abstractmethod
    def serve(self, method: str, handler: Handler) -> None:
        """Register ``handler`` for incoming calls of ``method`` on this peer (replacing an earlier one)."""

    @abstractmethod
    def dht_store(self, key: str, value: Any, expires_in: float, per_peer: bool = False) -> Awaitable[None]:
        """Store ``value`` under ``key`` for ``expires_in`` s; with ``per_peer``, as this peer's own entry of a
        dictionary record (one entry per peer, under its peer id).

        A peer's later store to the same key (and entry) replaces its earlier one, whatever the expiration
        times. Storing ``None`` withdraws it (``expires_in=0`` by convention): from then on it is absent.
        """

    @abstractmethod
    def dht_get(self, key: str) -> Awaitable[Any]:
        """The unexpired value under ``key``; for a dictionary record a ``{peer_id: value}`` dict of its
        unexpired entries, where what is under a peer's id was stored by that peer (the live backend checks
        the signature); ``None`` if there is none. A withdrawn record is absent: it is never returned as a
        ``None`` value, nor an entry with a ``None`` value (an empty dictionary record is ``None``).
        """

    @abstractmethod
    def spawn(self, coro: Coroutine[Any, Any, T]) -> Task:
        """Run ``coro`` concurrently as a task owned by this peer."""

    @abstractmethod
    def future(self) -> Future:
        """A new unresolved :class:`Future`."""

    @abstractmethod
    def gather(self, tasks: list[Task]) -> Awaitable[list[Any]]:
        """Wait for all ``tasks`` and return their results in order (the first failure is raised)."""
