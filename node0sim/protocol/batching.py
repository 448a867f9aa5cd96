"""Request batching: requests of one kind that wait for the accelerator are merged into one call.

Modelled on hivemind's TaskPool (one pool per expert method, its waiting tasks merged into a
batch): here one queue holds every kind, and the kind of the oldest waiting request is served next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from node0sim.model.costs import ComputeCost
from node0sim.runtime import Future, Runtime

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

    async def submit(self, kind: str, item: Any, cost: ComputeCost) -> Any:
        """The request's result, once its call ran; its rejection (or the call's failure) is raised."""
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
