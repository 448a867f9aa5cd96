"""The direct pipeline (``topology.pipeline=direct``): activations go from stage to stage, not through the trainer.

The relayed pipeline (``trainer.py``) is SWARM's and hivemind's: the trainer calls every stage, so each boundary's
activations cross the trainer's links twice, and a backward request resends the stage's input. Here, as in the
Protocol Models paper's 1F1B/GPipe pipeline, one micro-batch *try* (an ``attempt`` of it) is two chains of calls:

- **forward**: the trainer sends the micro-batch to a peer of stage 0 (its router's choice, as in the relayed mode);
  each server runs its forward, keeps the input until the backward, and calls a peer of the next stage that *its own*
  router picks (SWARM's rule, :class:`Router`, over the next stage's DHT records) with its output, the targets and the
  token ids. The tail runs forward, loss and backward in one call (as the relayed mode's fused tail) and keeps the
  input gradient.
- **backward**: the tail sends that gradient to the peer that sent it the forward; each server runs its backward
  from the input it kept (recomputed, as the relayed backward: the same numbers) and passes its input gradient to
  the peer that sent it the forward, down to stage 0. The peer of each stage is fixed along the path, so the input
  is kept (activation caching) instead of resent.

Every call returns along its path (a :class:`PipeResponse`, a few bytes): the loss, the tail that keeps the backward,
or the stage where a hop failed. The two schedules (``topology.schedule``) differ only in who starts the backward:

- ``1f1b``: the tail, as soon as the forward reaches it; the trainer keeps at most ``num_stages`` micro-batches in
  flight (a new one starts when the oldest one's forward call, which returns after its backward, is back), so each
  stage alternates forwards and backwards in the order they arrive (no priority between them);
- ``gpipe``: the trainer, once the forwards of all the step's micro-batches are back (a :class:`Barrier`): then all
  backwards. The tail's backward runs with its forward, so its own weights are at the same step either way.

Failures: a hop that gets no answer (``timeout``, ``lost``), an error (``refused``) or no peer (``no_peer``) is not
retried by the server; it fails the try back to the trainer, which retries the whole micro-batch (a new try, at most
``max_retries`` times, as the relayed mode counts them). A try's hops time out from the inside out (:func:`hop_timeout`),
so the stage nearest the failure reports it. Stages whose backward may have accumulated the failed try are left out
of the retries' accumulation (``accumulate_below``, :func:`retry_accumulate_below`), so each stage accumulates a
micro-batch at most once, the rule of the relayed mode's ``accumulate=false``. Every server refuses a request whose
activations or gradients are not finite or above ``train.max_abs_value`` (``bounds.py``); the trainer takes a reply that
is not a :class:`PipeResponse` as a lost hop, and drops a micro-batch whose loss is implausible (it came along the whole
path: no one peer can be blamed), so that loss is never recorded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from node0sim.protocol.bounds import loss_problem
from node0sim.protocol.messages import (
    PIPE_BACKWARD,
    PIPE_FORWARD,
    Payload,
    PipeBackwardRequest,
    PipeForwardRequest,
    PipeResponse,
    check_message,
    leading_dims,
)
from node0sim.protocol.progress import parse_stage, stage_key
from node0sim.protocol.routing import Router
from node0sim.protocol.stage_compute import Work
from node0sim.runtime import RemoteError, RequestTimeout, RPCError, Runtime

if TYPE_CHECKING:
    from node0sim.protocol.stage_server import StageServer
    from node0sim.protocol.trainer import Trainer

PIPELINES = ("relayed", "direct")
"""``topology.pipeline``: the trainer calls every stage (relayed), or each stage calls the next (direct)."""
DIRECT_SCHEDULES = ("1f1b", "gpipe")
"""``topology.schedule`` of the direct pipeline (see the module docstring)."""


def hop_timeout(request_timeout_s: float, num_stages: int, stage: int, backward: bool, backward_now: bool) -> float:
    """Timeout of a direct-pipeline call to ``stage``: ``request_timeout_s`` for each stage visit it waits for. A
    forward call waits for the forwards of ``stage`` .. the tail (whose visit includes its backward) and, with
    ``backward_now``, the backwards of the ``num_stages - 1`` stages before the tail; a backward call for the backwards
    of ``stage`` .. 0. Inner calls wait for fewer visits, so they time out first."""
    visits = stage + 1 if backward else num_stages - stage + (num_stages - 1 if backward_now else 0)
    return request_timeout_s * visits


def retry_accumulate_below(failure: str, stage: int, backward: bool, backward_now: bool, num_stages: int,
                           caller_kept_input: bool = False) -> int:
    """The stages a retry may accumulate (those below the result) after a call to ``stage`` failed with ``failure``.

    A refused call, or no peer, ran nothing there: after a forward nothing was accumulated; after a backward the stages
    above ``stage`` were (and the tail always was, with its forward). A call without an answer may have run: after a
    backward, ``stage`` too may have accumulated; after a forward, the tail (GPipe) or, with ``backward_now``, the
    stages from ``stage`` on if the caller still kept its input (it drops it now, so no backward can pass it), else any.
    """
    last = num_stages - 1
    if failure in ("refused", "no_peer"):
        return min(stage + 1, last) if backward else num_stages
    if backward:
        return stage
    if not backward_now:
        return last
    return stage if caller_kept_input else 0


class InvalidReply(RPCError):
    """A reply that is not a well-typed :class:`PipeResponse`: what ran of the call is not known (a ``lost`` hop)."""


def _checked_reply(response: object) -> PipeResponse:
    try:
        check_message(response, PipeResponse)
    except ValueError as wrong:
        raise InvalidReply(str(wrong)) from None
    return response


def _failure_of(error: RPCError) -> str:
    if isinstance(error, RequestTimeout):
        return "timeout"
    return "refused" if isinstance(error, RemoteError) else "lost"


@dataclass(frozen=True)
class DirectConfig:
    """A stage server's settings for the direct pipeline (the run's ``train`` values, as the trainer uses them)."""

    num_stages: int
    request_timeout_s: float = 30.0
    discovery_period_s: float = 5.0
    ban_s: float = 60.0
    max_ban_s: float = 960.0


@dataclass(frozen=True)
class _Kept:
    """What a server keeps of one micro-batch try between its forward and its backward."""

    work: Work
    epoch: int
    """The epoch of the weights its forward ran with (echoed into the backward, as the relayed trainer does)."""
    previous: str
    """The peer that sent the forward: where the input gradient goes (the trainer, for stage 0: nothing is sent)."""
    grad_inputs: Payload | None
    """The tail's input gradient, computed with its forward (None on the other stages)."""
    expires_s: float


class DirectHops:
    """A stage server's part of the direct pipeline: serves ``pipe_forward``/``pipe_backward`` and calls the next stage
    (routed by its own :class:`Router`, refreshed from the DHT at most every ``discovery_period_s``) or the previous one
    (the peer that sent the forward)."""

    def __init__(self, server: StageServer, run_id: str, cfg: DirectConfig):
        self.server = server
        self.rt: Runtime = server.rt
        self.cfg = cfg
        self.stage = server.stage
        self.last = cfg.num_stages - 1
        self.router = Router(random.Random(f"{self.rt.peer_id}/direct"), ban_s=cfg.ban_s, max_ban_s=cfg.max_ban_s)
        self._next_key = stage_key(run_id, self.stage + 1)
        self._discovered_s = -math.inf
        self._kept: dict[tuple[str, int, int], _Kept] = {}

    def serve(self) -> None:
        """Register the two handlers."""
        self.rt.serve(PIPE_FORWARD, self.handle_forward)
        self.rt.serve(PIPE_BACKWARD, self.handle_backward)

    async def handle_forward(self, caller: str, request: PipeForwardRequest) -> PipeResponse:
        """Forward (the tail: forward, loss and backward), keep the input, pass the output on."""
        self.server.check_request(request, PipeForwardRequest)
        key = request_key(request)
        is_tail = self.stage == self.last
        work = Work(request.inputs, self.server.token_ids(request), targets=request.targets if is_tail else None,
                    accumulate=self.stage < request.accumulate_below)
        expires_s = self.rt.now() + self._try_timeout()
        if is_tail:
            loss, grad_inputs = await self.server.run_tail(work, key)
            self._keep(key, _Kept(work, 0, caller, grad_inputs, expires_s))
            if request.backward_now:
                response = await self._backward(key, None)
                if not response.ok:
                    return response
            return PipeResponse(loss, tail=self.rt.peer_id)
        outputs, epoch = await self.server.run_forward(work)
        self._keep(key, _Kept(work, epoch, caller, None, expires_s))
        ids = request.inputs.to(torch.int32) if self.stage == 0 and self.server.compute.codec.needs_token_ids else request.token_ids
        forward = replace(request, stage=self.stage + 1, inputs=outputs, token_ids=ids)
        response = await self._hop(forward, await self._next_peer(leading_dims(outputs)[0]), key)
        if not response.ok:
            self._kept.pop(key, None)
        return response

    async def handle_backward(self, caller: str, request: PipeBackwardRequest) -> PipeResponse:
        """Backward of a kept forward (the tail: its kept input gradient), then on to the previous stage."""
        self.server.check_request(request, PipeBackwardRequest)
        key = request_key(request)
        if key not in self._kept:
            raise ValueError(f"stage {self.stage} keeps no forward of micro-batch {key} (expired, or never sent here)")
        if (request.grad_outputs is None) != (self.stage == self.last):
            raise ValueError(f"PipeBackwardRequest.grad_outputs: the tail takes none, stage {self.stage} needs one")
        return await self._backward(key, request.grad_outputs)

    async def _backward(self, key: tuple[str, int, int], grad_outputs: Payload | None) -> PipeResponse:
        kept = self._kept.pop(key)
        if self.stage == self.last:
            grad_inputs = kept.grad_inputs
        else:
            grad_inputs = await self.server.run_backward(replace(kept.work, grad_outputs=grad_outputs), kept.epoch, key)
        if self.stage == 0:
            return PipeResponse()
        return await self._hop(PipeBackwardRequest(self.stage - 1, *key, grad_inputs), kept.previous, key)

    async def _next_peer(self, samples: int) -> str | None:
        """The peer of the next stage expected to finish first (the stage's records re-read when they are old, or when
        none is known yet)."""
        next_stage = self.stage + 1
        if self.rt.now() - self._discovered_s >= self.cfg.discovery_period_s or not self.router.peers(next_stage):
            records = parse_stage(await self.rt.dht_get(self._next_key))
            self.router.update_peers(next_stage, {peer: r.throughput for peer, r in records.items() if r.ready})
            self._discovered_s = self.rt.now()
        return self.router.choose(next_stage, samples, self.rt.now())

    async def _hop(self, request: PipeForwardRequest | PipeBackwardRequest, peer: str | None, key: tuple[str, int, int]) -> PipeResponse:
        """Call ``peer`` (None: no peer available) for the try ``key``; a failure comes back as a failed response for the
        trainer (a failed forward drops the kept input first). The elapsed time of a forward hop, which the router
        learns from, covers the rest of the path."""
        backward = isinstance(request, PipeBackwardRequest)
        backward_now = not backward and request.backward_now
        stage, now = request.stage, self.rt.now
        failure = "no_peer"
        if peer is not None:
            timeout = hop_timeout(self.cfg.request_timeout_s, self.cfg.num_stages, stage, backward, backward_now)
            started = now()
            try:
                response = await self.rt.call(peer, PIPE_BACKWARD if backward else PIPE_FORWARD, request, timeout)
                if not backward:
                    self.router.report_success(stage, peer, leading_dims(request.inputs)[0], now() - started, now())
                return response
            except RPCError as error:
                if not backward:
                    self.router.report_failure(stage, peer, now())
                failure = _failure_of(error)
        kept = not backward and self._kept.pop(key, None) is not None
        bound = retry_accumulate_below(failure, stage, backward, backward_now, self.cfg.num_stages, kept)
        return PipeResponse(failed_stage=stage, failure=failure, accumulate_below=bound)

    def _try_timeout(self) -> float:
        """The longest one try's forward and backward calls may take: how long a kept input is worth keeping."""
        cfg = self.cfg
        return (hop_timeout(cfg.request_timeout_s, cfg.num_stages, 0, False, True)
                + hop_timeout(cfg.request_timeout_s, cfg.num_stages, self.last, True, False))

    def _keep(self, key: tuple[str, int, int], kept: _Kept) -> None:
        """Keep ``kept`` under ``key``, dropping what expired (tries whose backward never came)."""
        now = self.rt.now()
        for old in [k for k, v in self._kept.items() if v.expires_s <= now]:
            del self._kept[old]
        self._kept[key] = kept


class Barrier:
    """Released once ``count`` parties arrived (GPipe: the forwards of a step's micro-batches)."""

    def __init__(self, rt: Runtime, count: int):
        self._left = count
        self._released = rt.future()

    def arrive(self) -> None:
        """One party arrived."""
        self._left -= 1
        if self._left <= 0:
            self._released.set_result(None)

    async def arrive_and_wait(self) -> None:
        """Arrive, then wait until every party did."""
        self.arrive()
        await self._released.wait()


class DirectPipeline:
    """A trainer's side of the direct pipeline: one micro-batch's tries, their failures and retries."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.rt = trainer.rt
        self.num_stages = trainer.num_stages

    async def forward_backward(self, inputs: Payload, targets: Payload, request_id: int, barrier: Barrier | None) -> float | None:
        """The micro-batch's loss; with a ``barrier`` (GPipe) its backward starts once every forward of the step is
        back. A failed try is retried whole (after ``discovery_period_s`` when a stage had no peer, as the relayed
        trainer waits); after ``max_retries`` retries an :class:`RPCError` is raised."""
        trainer, cfg, stats = self.trainer, self.trainer.cfg, self.trainer.stats
        last = self.num_stages - 1
        accumulate_below = self.num_stages
        waited = barrier is None
        try:
            for attempt in range(cfg.max_retries + 1):
                if attempt:
                    stats.retried_requests += 1
                request = PipeForwardRequest(0, inputs, targets, self.rt.peer_id, request_id, attempt, accumulate_below,
                                             backward_now=barrier is None)
                response = await self._call(0, PIPE_FORWARD, request, trainer.router.choose(0, leading_dims(inputs)[0], self.rt.now()))
                loss = response.loss
                if response.ok and not waited:
                    waited = True
                    await barrier.arrive_and_wait()
                if response.ok and barrier is not None:
                    response = await self._call(last, PIPE_BACKWARD, PipeBackwardRequest(last, *request_key(request)), response.tail)
                if response.ok:
                    problem = loss_problem(loss, cfg.max_loss)
                    if problem is not None:  # it came along the whole path: no one peer to blame, so it is not recorded
                        stats.invalid_replies += 1
                        raise RPCError(f"micro-batch {request_id}: {problem}")
                    return loss
                stats.failed_requests += 1
                stats.timed_out_requests += response.failure == "timeout"
                stats.no_peer_requests += response.failure == "no_peer"
                stats.refused_requests += response.failure == "refused"
                stats.lost_requests += response.failure == "lost"
                if response.failure == "no_peer":  # the pipeline stalls at that stage: look again a while later
                    await self.rt.sleep(cfg.discovery_period_s)
                    await trainer.discover()
                if response.accumulate_below < accumulate_below:
                    accumulate_below = response.accumulate_below
                    stats.unaccumulated_retries += 1
        finally:
            if not waited:
                barrier.arrive()
        raise RPCError(f"micro-batch {request_id}: the direct pipeline failed after {cfg.max_retries} retries")

    async def _call(self, stage: int, method: str, request: PipeForwardRequest | PipeBackwardRequest, peer: str | None) -> PipeResponse:
        """The trainer's call to stage 0 (forward) or to the tail (GPipe's backward); a failure as a failed response. The
        router learns from a forward's elapsed time, which covers the whole path (as the servers' routers do)."""
        trainer = self.trainer
        backward = method == PIPE_BACKWARD
        backward_now = not backward and request.backward_now
        if peer is None:
            return PipeResponse(failed_stage=stage, failure="no_peer",
                                accumulate_below=retry_accumulate_below("no_peer", stage, backward, backward_now, self.num_stages))
        started = self.rt.now()
        try:
            timeout = hop_timeout(trainer.cfg.request_timeout_s, self.num_stages, stage, backward, backward_now)
            response = _checked_reply(await self.rt.call(peer, method, request, timeout))
        except RPCError as error:
            trainer.stats.invalid_replies += isinstance(error, InvalidReply)
            if not backward:
                trainer.router.report_failure(stage, peer, self.rt.now())
            failure = _failure_of(error)
            return PipeResponse(failed_stage=stage, failure=failure,
                                accumulate_below=retry_accumulate_below(failure, stage, backward, backward_now, self.num_stages))
        if not backward:
            trainer.router.report_success(stage, peer, leading_dims(request.inputs)[0], self.rt.now() - started, self.rt.now())
        trainer.stats.stage_bytes[stage] = trainer.stats.stage_bytes.get(stage, 0) + request.wire_bytes() + response.wire_bytes()
        return response


def request_key(request: PipeForwardRequest | PipeBackwardRequest) -> tuple[str, int, int]:
    """``(origin, request_id, attempt)``: the try a request belongs to."""
    return request.origin, request.request_id, request.attempt

