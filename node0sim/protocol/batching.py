"""Request batching: requests of one kind that wait for the accelerator are merged into one call.

Modelled on hivemind's TaskPool (one pool per expert method, its waiting tasks merged into a
batch): here one queue holds every kind, and the kind of the oldest waiting request is served next.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from node0sim.model.costs import ComputeCost
from node0sim.runtime import Future, Runtime

REMEMBERED_KEYS = 4096
"""Keys of served requests a queue remembers to refuse their late duplicates (a trainer retries within seconds)."""

RunBatch = Callable[[str, list[Any]], list[Any]]
"""``run_batch(kind, items)``: one result per item, an ``Exception`` for an item rejected on its own."""


@dataclass(eq=False)
class _Job:
    """A request waiting for the accelerator, and where its result goes."""

    kind: str
    item: Any
    cost: ComputeCost
    result: Future


class BatchingQueue:
    """Serves requests through ``run_batch`` on the accelerator, up to ``max_batch_requests`` per call.

    With ``max_batch_requests`` 1 every request is its own call, started at once. Otherwise one call
    runs at a time: it serves the oldest waiting request together with the next same-kind requests
    (in arrival order, at most ``max_batch_requests`` in all) and costs their merged work (larger products,
    :meth:`ComputeCost.merge`). Each
    request gets its own result or its own rejection; a call that fails as a whole fails its batch only.
    """

    def __init__(self, rt: Runtime, run_batch: RunBatch, max_batch_requests: int):
        if max_batch_requests < 1:
            raise ValueError(f"max_batch_requests must be >= 1, got {max_batch_requests}")
        self.rt = rt
        self.run_batch = run_batch
        self.max_batch_requests = max_batch_requests
        self._queue: list[_Job] = []
        self._dispatching = False
        self._running: dict[Hashable, list[Future]] = {}
        """Keyed requests being served, with the futures of their duplicates waiting for the same result."""
        self._served: OrderedDict[Hashable, None] = OrderedDict()
        """Keys of the last ``REMEMBERED_KEYS`` keyed requests served."""
        self.duplicates = 0
        """Keyed requests that arrived again while (or after) the first was served: none was run a second time."""

    async def submit(self, kind: str, item: Any, cost: ComputeCost, key: Hashable | None = None) -> Any:
        """The request's result, once its call ran; its rejection (or the call's failure) is raised.

        A request with a ``key`` runs at most once: a duplicate that arrives while the first is served gets the same
        result (or rejection); one that arrives after it was served is refused, naming the key.
        """
        if key is None:
            return await self._submit(kind, item, cost)
        if key in self._running or key in self._served:
            self.duplicates += 1
            if key in self._served:
                raise ValueError(f"request {key} was already served by this peer (a duplicate: not run again)")
            waiter = self.rt.future()
            self._running[key].append(waiter)
            result = await waiter.wait()
            if isinstance(result, Exception):
                raise result
            return result
        self._running[key] = []
        result: Any = ValueError(f"request {key} was not served")  # what duplicates get if serving it is cancelled
        try:
            result = await self._submit(kind, item, cost)
            self._served[key] = None
            while len(self._served) > REMEMBERED_KEYS:
                self._served.popitem(last=False)
            return result
        except Exception as error:
            result = error
            raise
        finally:
            for waiter in self._running.pop(key):
                waiter.set_result(result)

    async def _submit(self, kind: str, item: Any, cost: ComputeCost) -> Any:
        if self.max_batch_requests == 1:
            (result,) = await self.rt.compute(cost, lambda: self.run_batch(kind, [item]))
        else:
            job = _Job(kind, item, cost, self.rt.future())
            self._queue.append(job)
            if not self._dispatching:
                self._dispatching = True
                self.rt.spawn(self._dispatch())
            result = await job.result.wait()
        if isinstance(result, Exception):
            raise result
        return result

    async def _dispatch(self) -> None:
        """Until the queue is empty: merge the oldest request with the same-kind ones waiting behind it, run them."""
        try:
            while self._queue:
                kind = self._queue[0].kind
                batch = [job for job in self._queue if job.kind == kind][: self.max_batch_requests]
                self._queue = [job for job in self._queue if job not in batch]
                items = [job.item for job in batch]
                try:
                    cost = ComputeCost.merge([job.cost for job in batch])
                    results = await self.rt.compute(cost, lambda: self.run_batch(kind, items))
                except Exception as error:  # not a malformed request (those come back as results): fail the batch
                    results = [error] * len(batch)
                for job, result in zip(batch, results):
                    job.result.set_result(result)
        finally:
            self._dispatching = False
