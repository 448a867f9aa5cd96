"""The trainer: pushes micro-batches forward head -> tail and backward tail -> head."""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import torch

from node0sim.protocol.bounds import largest_magnitude, layout, loss_problem, magnitude_problem
from node0sim.protocol.codecs import Codec
from node0sim.protocol.direct import DIRECT_SCHEDULES, PIPELINES, Barrier, DirectPipeline
from node0sim.protocol.messages import (
    BACKWARD,
    FORWARD,
    PROBE,
    TAIL,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    Payload,
    ProbeRequest,
    ProbeResponse,
    TailRequest,
    TailResponse,
    check_message,
    leading_dims,
)
from node0sim.protocol.progress import read_stages
from node0sim.protocol.routing import Router
from node0sim.protocol.tensors import describe, full_like, is_tensor, mean_value
from node0sim.runtime import RemoteError, RequestTimeout, RPCError, Runtime, Task

TAIL_CALLS = ("fused", "separate")
"""How the trainer calls the last stage: ``fused`` (one ``tail`` call: forward, loss and backward) or ``separate``
(a ``forward`` call that returns the per-token loss, then a ``backward`` call that recomputes it, as Node0's clients
call its tail expert: ``node0/server/module_collab.py``, ``models/llama/layers.py``)."""


class MicroBatchSource(Protocol):
    """Where micro-batches come from: ``(inputs, targets)`` token payloads of shape [B, T]."""

    def next_micro_batch(self) -> tuple[Payload, Payload]:
        """The next micro-batch."""


class StageLayouts(Protocol):
    """The layouts a stage's replies have (a :class:`~node0sim.protocol.stage_compute.StageCompute` of the stage gives them)."""

    codec: Codec

    def output_spec(self, batch: int, seq_len: int, per_token_loss: bool = False) -> Payload:
        """A forward response's outputs."""

    def input_grad_spec(self, batch: int, seq_len: int) -> Payload | None:
        """A backward or tail response's input gradient."""


RESPONSE_CLASSES = {ForwardRequest: ForwardResponse, BackwardRequest: BackwardResponse, TailRequest: TailResponse}
"""The class of the reply to each request class the trainer sends."""

HEDGE_WINDOW = 100
"""Successful calls per stage and method whose latencies give the hedge deadline (the most recent ones)."""
HEDGE_MIN_CALLS = 20
"""Hedging starts once a stage and method has this many latencies: a 95th percentile of fewer is one or two samples."""


@dataclass(frozen=True)
class TrainerConfig:
    """How the trainer drives the pipeline.

    The trainer pushes ``micro_batches`` micro-batches in total; with ``schedule="sync"`` it
    pushes them ``micro_batches_per_step`` at a time and waits for each group to come back.
    ``tail_calls``: one of :data:`TAIL_CALLS`. ``pipeline``: one of :data:`PIPELINES` (``direct``: see ``direct.py``,
    with ``direct_schedule`` one of :data:`DIRECT_SCHEDULES`). ``max_abs_value`` and ``max_loss`` bound the values and
    the loss of a valid reply (``bounds.py``; the run sets ``train.max_abs_value`` and ``train.max_loss_ratio`` x ln V).
    ``hedge_quantile``: see :meth:`Trainer._ask` (None: no hedging). ``probe_timeout_s``: see :meth:`Trainer.discover`
    (None: every listed peer gets work at once).
    """

    micro_batches: int
    micro_batches_per_step: int
    schedule: str = "sync"
    max_inflight: int = 4
    request_timeout_s: float = 30.0
    max_retries: int = 3
    discovery_period_s: float = 5.0
    startup_poll_s: float = 0.5
    ban_s: float = 60.0
    max_ban_s: float = 960.0
    send_token_ids: bool = False
    tail_calls: str = "fused"
    pipeline: str = "relayed"
    direct_schedule: str = "1f1b"
    max_abs_value: float = math.inf
    max_loss: float = math.inf
    hedge_quantile: float | None = None
    probe_timeout_s: float | None = None


@dataclass
class TrainerStats:
    """What happened to the micro-batches and requests of one trainer."""

    micro_batches_started: int = 0
    micro_batches_done: int = 0
    micro_batches_dropped: int = 0
    samples: int = 0
    tokens: int = 0
    failed_requests: int = 0
    timed_out_requests: int = 0
    """Failed requests that got no answer within ``request_timeout_s``."""
    no_peer_requests: int = 0
    """Failed attempts that found no available peer of the stage (none announced, or all banned)."""
    refused_requests: int = 0
    """Failed requests the peer refused (a ``RemoteError``: a bound, a malformed request, a method it does not serve)."""
    lost_requests: int = 0
    """Failed requests whose connection failed before the reply (a dial refused, a peer killed mid-call, a reply cut
    short). With ``timed_out_requests``, ``no_peer_requests`` and ``invalid_replies``, every failed request of the relayed
    pipeline has one named cause."""
    retried_requests: int = 0
    unaccumulated_retries: int = 0
    """Backward/tail requests whose retries or hedges asked for the input gradient only, after an attempt got no answer
    (or none yet: a hedge)."""
    hedged_requests: int = 0
    """Requests also sent to a second replica because the first had not answered by the hedge deadline."""
    hedges_won: int = 0
    """Hedged requests whose second replica gave the reply used (the first was cancelled)."""
    failed_probes: int = 0
    """Probes of newly listed peers that got no valid answer (``probe_timeout_s``): those peers got no work."""
    invalid_replies: int = 0
    """Replies refused (also counted as failed requests): of another class or layout, with non-finite or too large
    values, or an implausible loss."""
    largest_value: float = 0.0
    """The largest |value| of the valid replies (what ``train.max_abs_value`` is measured against)."""
    largest_loss: float = 0.0
    """The largest loss of the valid replies (what ``train.max_loss_ratio`` is measured against)."""
    losses: list[float] = field(default_factory=list)
    stage_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes of successful requests and responses, per stage called."""
    request_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Call to reply of each successful request (runtime clock), per method: the per-request latency."""
    last_start_s: float | None = None
    """When this trainer last started a micro-batch (runtime clock): from then on it no longer keeps its pipeline
    full, so the pipeline drains (the steady-state window ends there)."""
    peak_in_flight: int = 0
    """The most micro-batches this trainer had in flight at once (the steady-state window skips the first two such
    generations: the pipeline's fill)."""

    @property
    def micro_batches_in_flight(self) -> int:
        """Micro-batches started and neither done nor dropped (nonzero when a run is stopped mid-way)."""
        return self.micro_batches_started - self.micro_batches_done - self.micro_batches_dropped


class NoPeerForStage(RPCError):
    """No live peer serves a stage (the pipeline is stalled there)."""


def in_flight_window(cfg: TrainerConfig, num_stages: int, step_size: int) -> int:
    """How many micro-batches a trainer may have in flight: a step's (``step_size``; relayed ``sync``, GPipe),
    ``num_stages`` (1F1B) or ``max_inflight`` (relayed ``async``)."""
    if cfg.pipeline == "direct":
        return step_size if cfg.direct_schedule == "gpipe" else num_stages
    return step_size if cfg.schedule == "sync" else cfg.max_inflight


class Trainer:
    """Drives micro-batches through the pipeline and reports each finished one to ``on_micro_batch``.

    ``schedule="sync"``: the micro-batches of a step run concurrently (GPipe-style) and the
    next step starts when all are back, so every stage updates exactly once per step on fresh
    weights. ``schedule="async"``: up to ``max_inflight`` micro-batches are always in flight and
    stages update whenever they have accumulated a step's worth of samples, so gradients are stale.

    ``pipeline="direct"`` (:class:`DirectPipeline`): the trainer sends each micro-batch to stage 0 only, and the stages
    pass it on. ``1f1b`` keeps at most ``num_stages`` micro-batches in flight (per step with ``sync``; across steps with
    ``async``); ``gpipe`` runs each step's forwards, then its backwards (with either schedule).
    """

    def __init__(
        self,
        rt: Runtime,
        run_id: str,
        num_stages: int,
        source: MicroBatchSource,
        cfg: TrainerConfig,
        on_micro_batch: Callable[[dict[str, Any]], None],
        layouts: Sequence[StageLayouts] | None = None,
    ):
        """``layouts``: per stage, the layouts its replies must have (None: any layout of finite bounded values)."""
        if cfg.schedule not in ("sync", "async"):
            raise ValueError(f"schedule must be 'sync' or 'async', got {cfg.schedule!r}")
        if cfg.tail_calls not in TAIL_CALLS:
            raise ValueError(f"tail_calls must be one of {list(TAIL_CALLS)}, got {cfg.tail_calls!r}")
        if cfg.pipeline not in PIPELINES or cfg.direct_schedule not in DIRECT_SCHEDULES:
            raise ValueError(f"pipeline must be one of {list(PIPELINES)} and direct_schedule one of {list(DIRECT_SCHEDULES)}, "
                             f"got {cfg.pipeline!r} and {cfg.direct_schedule!r}")
        if cfg.pipeline == "direct" and cfg.tail_calls != "fused":
            raise ValueError("the direct pipeline calls its tail fused (tail_calls='fused')")
        self.rt = rt
        self.run_id = run_id
        self.num_stages = num_stages
        self.source = source
        self.cfg = cfg
        self.on_micro_batch = on_micro_batch
        self.layouts = layouts
        self.stats = TrainerStats()
        self.router = Router(random.Random(rt.peer_id), ban_s=cfg.ban_s, max_ban_s=cfg.max_ban_s,
                             require_proof=cfg.probe_timeout_s is not None)
        self._probes: dict[tuple[int, str], Task] = {}
        """The probes in flight, by stage and peer."""
        self._micro_batch_ids = itertools.count(1)
        self._latencies: dict[tuple[int, str], deque[float]] = {}
        """The latest successful calls' latencies, per stage and method (for the hedge deadline)."""
        self.direct = DirectPipeline(self) if cfg.pipeline == "direct" else None

    async def run(self) -> TrainerStats:
        """Train until ``cfg.micro_batches`` micro-batches are done (or dropped)."""
        await self._wait_for_pipeline()
        discovery = self.rt.spawn(self._keep_discovering())
        try:
            await self._train()
        finally:
            discovery.cancel()
            for probe in list(self._probes.values()):
                probe.cancel()
        return self.stats

    async def _train(self) -> None:
        cfg = self.cfg
        gpipe = self.direct is not None and cfg.direct_schedule == "gpipe"
        if cfg.schedule == "sync" or gpipe:
            for first in range(0, cfg.micro_batches, cfg.micro_batches_per_step):
                count = min(cfg.micro_batches_per_step, cfg.micro_batches - first)
                await self._run_window(count, self._window(count), Barrier(self.rt, count) if gpipe else None)
        else:
            await self._run_window(cfg.micro_batches, self._window(cfg.micro_batches_per_step))

    def _window(self, step_size: int) -> int:
        return in_flight_window(self.cfg, self.num_stages, step_size)

    async def _run_window(self, count: int, window: int, barrier: Barrier | None = None) -> None:
        """Run ``count`` micro-batches, starting the next one when the oldest of ``window`` in flight is back."""
        inflight: list[Task] = []
        for _ in range(count):
            if len(inflight) >= window:
                await inflight.pop(0).join()
            inflight.append(self.rt.spawn(self._micro_batch(barrier)))
        await self.rt.gather(inflight)

    async def _wait_for_pipeline(self) -> None:
        while True:
            await self.discover()
            if all(self.router.proven_peers(stage) for stage in range(self.num_stages)):
                return
            await self.rt.sleep(self.cfg.startup_poll_s)

    async def _keep_discovering(self) -> None:
        while True:
            await self.rt.sleep(self.cfg.discovery_period_s)
            await self.discover()

    async def discover(self) -> None:
        """Refresh every stage's peers and their announced throughputs from the DHT.

        With ``cfg.probe_timeout_s``, a peer listed for the first time gets no work until it answered a probe (a
        :class:`ProbeRequest` for its stage) within that time; one that does not is banned as after a failed request,
        and probed again once the ban is over. Writing a stage record costs nothing: without probes every entry gets
        requests, also one of many identities a single peer made or a process that accepts calls and never answers,
        and each such request costs its micro-batch a retry or a request timeout. Probes run beside the training.
        """
        for stage, records in enumerate(await read_stages(self.rt, self.run_id, self.num_stages)):
            self.router.update_peers(stage, {p: r.throughput for p, r in records.items() if r.ready})
            for peer in self.router.unproven(stage, self.rt.now()):
                if (stage, peer) not in self._probes:
                    self._probes[stage, peer] = self.rt.spawn(self._probe(stage, peer))

    async def _probe(self, stage: int, peer: str) -> None:
        """Ask ``peer`` whether it serves ``stage``: prove it in the router if it does, else ban it."""
        try:
            response = await self.rt.call(peer, PROBE, ProbeRequest(stage), self.cfg.probe_timeout_s)
            answered = isinstance(response, ProbeResponse) and response.stage == stage
        except RPCError:
            answered = False
        finally:
            self._probes.pop((stage, peer), None)
        if answered:
            self.router.prove(stage, peer)
        else:
            self.stats.failed_probes += 1
            self.router.report_failure(stage, peer, self.rt.now())

    async def _call(self, stage: int, method: str, request: Any, samples: int, backward: bool = False) -> Any:
        """Call the peer of ``stage`` expected to finish first; on failure ban it and retry on another.

        Once a backward or tail attempt got no answer (a timeout, a connection lost mid-call: anything but a refusal),
        the peer may have accumulated it: the retries ask for the input gradient only (``accumulate=False``), so the
        stage accumulates the micro-batch at most once.

        A reply is used only if :meth:`check_reply` finds nothing wrong with it; an invalid one is the replying peer's
        failure (banned, retried on another peer). So every payload the trainer relays passed the check an honest server
        applies at its boundary (``bounds.check_message_values``, the same function on the same tensors, and the
        layout the stage's codec sends): a refusal is the refusing peer's failure, never blamed on the one before.
        """
        tried: list[str] = []
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.stats.retried_requests += 1
            peer = self.router.choose(stage, samples, self.rt.now(), backward, exclude=tried)
            if peer is None:  # nobody serves this stage right now: the pipeline stalls here
                self.stats.failed_requests += 1
                self.stats.no_peer_requests += 1
                await self.rt.sleep(self.cfg.discovery_period_s)
                await self.discover()
                continue
            response, request = await self._ask(stage, peer, method, request, samples, backward, tried)
            if response is not None:
                return response
        raise NoPeerForStage(f"stage {stage}: {method} failed after {self.cfg.max_retries} retries")

    async def _ask(
        self, stage: int, peer: str, method: str, request: Any, samples: int, backward: bool, tried: list[str]
    ) -> tuple[Any | None, Any]:
        """``peer``'s valid reply to ``request`` (None: the call failed) and the request a retry sends.

        Hedging (``cfg.hedge_quantile`` q): a call still unanswered after the q-quantile of the stage's latest latencies
        for ``method`` also goes to the peer the router chooses next, and the first valid reply wins; the other call is
        cancelled (a first peer outpaced so gets its estimate lowered, not a ban). So a frozen replica costs the
        deadline, not the request timeout. The hedge and the retries after it ask for the input gradient only (the
        first peer may still run the request). The 95th percentile is "The Tail at Scale"'s choice (Dean & Barroso, CACM 56(2), 2013:
        hedged requests deferred until the first has been outstanding longer than the 95th-percentile latency).
        """
        deadline = self._hedge_deadline(stage, method)
        if deadline is None:
            response, may_have_run = await self._try(stage, peer, method, request, samples, backward, tried)
        else:
            response, may_have_run, request = await self._hedged(stage, peer, method, request, samples, backward, tried, deadline)
        return response, self._unaccumulated(request) if may_have_run else request

    async def _hedged(
        self, stage: int, peer: str, method: str, request: Any, samples: int, backward: bool, tried: list[str], deadline: float
    ) -> tuple[Any | None, bool, Any]:
        """:meth:`_try` on ``peer``, raced by a hedge to the next peer once ``deadline`` seconds passed: the winner's reply,
        whether the failed call may have run the request, and the request last sent (the hedge's asks for no
        accumulation)."""
        finished = self.rt.future()
        running: dict[str, Task] = {}

        async def attempt(target: str, sent: Any) -> None:
            try:
                response, may_have_run = await self._try(stage, target, method, sent, samples, backward, tried)
            except Exception as bug:  # raised where the call was made, as without hedging
                finished.set_result((target, bug, False))
                return
            del running[target]
            if response is not None or not running:  # a valid reply, or the last call failed
                finished.set_result((target, response, may_have_run))

        async def outcome(timeout: float | None = None) -> tuple[str, Any, bool]:
            target, response, may_have_run = await finished.wait(timeout)
            if isinstance(response, Exception):
                raise response
            return target, response, may_have_run

        started = self.rt.now()
        running[peer] = self.rt.spawn(attempt(peer, request))
        try:
            _, response, may_have_run = await outcome(deadline)
            return response, may_have_run, request
        except TimeoutError:
            pass
        second = self.router.choose(stage, samples, self.rt.now(), backward, exclude=[*tried, peer])
        if second is not None:
            request = self._unaccumulated(request)
            self.stats.hedged_requests += 1
            running[second] = self.rt.spawn(attempt(second, request))
        winner, response, may_have_run = await outcome()
        for task in running.values():
            task.cancel()
        if response is not None and winner == second:
            self.stats.hedges_won += 1
            self.router.report_outpaced(stage, peer, samples, self.rt.now() - started, backward)
        return response, may_have_run, request

    def _hedge_deadline(self, stage: int, method: str) -> float | None:
        """Seconds after which a call to ``stage`` is hedged (None: no hedging, or too few latencies yet)."""
        latencies = self._latencies.get((stage, method))
        if self.cfg.hedge_quantile is None or latencies is None or len(latencies) < HEDGE_MIN_CALLS:
            return None
        ordered = sorted(latencies)
        return ordered[min(len(ordered) - 1, math.ceil(self.cfg.hedge_quantile * len(ordered)) - 1)]

    def _unaccumulated(self, request: Any) -> Any:
        """``request`` asking for the input gradient only if it is a backward or tail that accumulates (counted)."""
        if isinstance(request, (BackwardRequest, TailRequest)) and request.accumulate:
            self.stats.unaccumulated_retries += 1
            return replace(request, accumulate=False)
        return request

    async def _try(
        self, stage: int, peer: str, method: str, request: Any, samples: int, backward: bool, tried: list[str]
    ) -> tuple[Any | None, bool]:
        """``peer``'s valid reply, or None and whether the failed call may have run the request (a failure bans it)."""
        started = self.rt.now()
        try:
            response = await self.rt.call(peer, method, request, self.cfg.request_timeout_s)
        except RPCError as error:
            self._failed(stage, peer, tried)
            refused, timed_out = isinstance(error, RemoteError), isinstance(error, RequestTimeout)
            self.stats.timed_out_requests += timed_out
            self.stats.refused_requests += refused
            self.stats.lost_requests += not (refused or timed_out)
            return None, not refused
        if self.check_reply(stage, request, response) is not None:
            # the retry still accumulates: what an invalid peer accumulated is not the stage's honest count
            self._failed(stage, peer, tried)
            self.stats.invalid_replies += 1
            return None, False
        elapsed = self.rt.now() - started
        self.router.report_success(stage, peer, samples, elapsed, self.rt.now(), backward)
        self.stats.request_seconds.setdefault(method, []).append(elapsed)
        self._latencies.setdefault((stage, method), deque(maxlen=HEDGE_WINDOW)).append(elapsed)
        self.stats.stage_bytes[stage] = self.stats.stage_bytes.get(stage, 0) + request.wire_bytes() + response.wire_bytes()
        return response, False

    def _failed(self, stage: int, peer: str, tried: list[str]) -> None:
        """``peer`` of ``stage`` failed a request: ban it and try another."""
        self.stats.failed_requests += 1
        self.router.report_failure(stage, peer, self.rt.now())
        tried.append(peer)

    def check_reply(self, stage: int, request: Any, response: Any) -> str | None:
        """What is wrong with ``stage``'s reply to ``request`` (None: nothing, and its largest value and loss are
        counted): its class, a negative epoch stamp, its payload's layout and what the codec's decoder would refuse
        (with ``layouts``), non-finite or too large values (``cfg.max_abs_value``), an implausible loss (``cfg.max_loss``)."""
        try:
            check_message(response, RESPONSE_CLASSES[type(request)])
        except ValueError as wrong:
            return str(wrong)
        batch, seq_len = leading_dims(request.inputs)
        per_token_loss = isinstance(response, ForwardResponse) and request.targets is not None
        if isinstance(response, ForwardResponse) and response.epoch < 0:  # echoed in a backward: an honest server refuses it
            return f"stage {stage}: ForwardResponse.epoch must be >= 0, got {response.epoch}"
        payload = response.outputs if isinstance(response, ForwardResponse) else response.grad_inputs
        if self.layouts:
            layouts = self.layouts[stage]
            if isinstance(response, ForwardResponse):
                expected = layouts.output_spec(batch, seq_len, per_token_loss)
            else:
                expected = layouts.input_grad_spec(batch, seq_len)
            if layout(payload) != layout(expected):
                return f"stage {stage} replied {layout(payload)}, expected {layout(expected)}"
            try:
                if payload is not None and not per_token_loss:
                    layouts.codec.check_wire(payload)
            except ValueError as wrong:
                return f"stage {stage}: {wrong}"
        largest = 0.0 if payload is None else largest_magnitude(payload)
        problem = magnitude_problem(largest, self.cfg.max_abs_value)
        if problem is not None:
            return f"stage {stage}: {problem}"
        loss = response.loss if isinstance(response, TailResponse) else None
        if per_token_loss:
            if not is_tensor(payload) or tuple(payload.shape) != (batch, seq_len):
                return f"stage {stage}: the per-token loss must be [{batch}, {seq_len}], got {describe(payload)}"
            loss = mean_value(payload)
        problem = loss_problem(loss, self.cfg.max_loss)
        if problem is not None:
            return f"stage {stage}: {problem}"
        self.stats.largest_value = max(self.stats.largest_value, largest)
        self.stats.largest_loss = max(self.stats.largest_loss, loss or 0.0)
        return None

    async def _micro_batch(self, barrier: Barrier | None) -> None:
        self.stats.micro_batches_started += 1
        self.stats.last_start_s = self.rt.now()
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.micro_batches_in_flight)
        inputs, targets = self.source.next_micro_batch()
        request_id = next(self._micro_batch_ids)
        try:
            if self.direct is not None:
                loss = await self.direct.forward_backward(inputs, targets, request_id, barrier)
            else:
                loss = await self._forward_backward(inputs, targets, request_id)
        except RPCError:
            self.stats.micro_batches_dropped += 1
            return
        batch, seq_len = leading_dims(inputs)
        self.stats.micro_batches_done += 1
        self.stats.samples += batch
        self.stats.tokens += batch * seq_len
        if loss is not None:
            self.stats.losses.append(loss)
        self.on_micro_batch({"time_s": self.rt.now(), "loss": loss, "samples": batch, "tokens": batch * seq_len})

    def _side_channel(self, inputs: Payload) -> Payload | None:
        """Token ids sent with boundary activations (as int32) when the codec needs them."""
        if not self.cfg.send_token_ids:
            return None
        return inputs.to(torch.int32)

    async def _forward_backward(self, inputs: Payload, targets: Payload, request_id: int) -> float | None:
        """The micro-batch's loss; its backward and tail requests carry ``request_id`` (the same on every retry), so a
        server accumulates it once."""
        last = self.num_stages - 1
        ids = self._side_channel(inputs)
        samples = leading_dims(inputs)[0]
        stage_inputs, epochs = [inputs], []
        for stage in range(last):
            request = ForwardRequest(stage, stage_inputs[-1], None if stage == 0 else ids)
            response = await self._call(stage, FORWARD, request, samples)
            stage_inputs.append(response.outputs)
            epochs.append(response.epoch)
        loss, grad = await self._tail(stage_inputs[last], targets, None if last == 0 else ids, samples, request_id)
        for stage in reversed(range(last)):
            request = BackwardRequest(
                stage, stage_inputs[stage], grad, None if stage == 0 else ids, epoch=epochs[stage], request_id=request_id
            )
            grad = (await self._call(stage, BACKWARD, request, samples, backward=True)).grad_inputs
        return loss

    async def _tail(
        self, inputs: Payload, targets: Payload, ids: Payload | None, samples: int, request_id: int
    ) -> tuple[float | None, Payload | None]:
        """The last stage's mean loss and input gradient: from one fused call, or from a forward call (the per-token
        loss) and a backward call with that loss's gradient, 1/T per token: the sum over sequences of each one's mean
        loss, what the fused tail backpropagates."""
        last = self.num_stages - 1
        if self.cfg.tail_calls == "fused":
            tail = await self._call(last, TAIL, TailRequest(last, inputs, targets, ids, request_id=request_id), samples, backward=True)
            return tail.loss, tail.grad_inputs
        forward = await self._call(last, FORWARD, ForwardRequest(last, inputs, ids, targets), samples)
        token_losses = forward.outputs
        loss_grad = full_like(token_losses, 1.0 / leading_dims(token_losses)[1])
        request = BackwardRequest(last, inputs, loss_grad, ids, epoch=forward.epoch, request_id=request_id, targets=targets)
        backward = await self._call(last, BACKWARD, request, samples, backward=True)
        return mean_value(token_losses), backward.grad_inputs
