"""A stage server: serves one pipeline stage and keeps its weights in step with the stage's other peers.

It composes the parts hivemind also keeps apart: a :class:`ProgressTracker` (this peer's record in
the DHT, and the stage's), a :class:`BatchingQueue` (waiting same-kind requests merged into one
accelerator call of up to ``max_batch_requests``), a :class:`Matchmaker` and the averager (the
in-stage all-reduce), and :class:`StateTransfer` (joiners download the stage's state).

Per epoch (``averaging.target_batch_size`` samples across the stage's peers) the peers that are
ready average their gradients (sample-weighted) and step; every ``average_state_every`` epochs
they also average a fraction of their parameters (SPARTA: random entries each time, or Node0's
fixed partition cycled, optimizer state too); a peer that falls more than ``max_allowed_stale``
epochs behind, or joins, downloads the stage's state from a peer. With ``blocks_serving`` no
backward runs while the stage averages and steps (:class:`OptimizerLock`); the watchdog keys make
the peer exit as Node0's ``n0/utils/monitor.py`` does (:meth:`StageServer.exit`).
"""

from __future__ import annotations

import hashlib
import math
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Hashable

from node0sim.protocol.averaging import AveragerFactory, AveragingConfig, GroupAverager
from node0sim.protocol.batching import BatchingQueue
from node0sim.protocol.bounds import check_message_values
from node0sim.protocol.checkpoints import CheckpointError, CheckpointStore
from node0sim.protocol.direct import DirectConfig, DirectHops
from node0sim.protocol.matchmaking import Matchmaker
from node0sim.protocol.messages import (
    BACKWARD,
    FORWARD,
    GET_STATE,
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
from node0sim.protocol.powersgd import PowerSGD
from node0sim.protocol.progress import ProgressTracker
from node0sim.protocol.stage_compute import StageCompute, Work
from node0sim.protocol.staleness import StalenessStats, WeightHistory, mean_delay
from node0sim.protocol.state_transfer import JOIN_RESUME_FRACTION, StateRequest, StateResponse, StateTransfer
from node0sim.protocol.tensors import all_finite
from node0sim.runtime import Future, Runtime, Task


@dataclass
class ServerStats:
    """What a stage server did."""

    samples: int = 0
    epochs: int = 0
    averaging_rounds: int = 0
    last_group_size: int = 0
    solo_steps: int = 0
    state_averaging_rounds: int = 0
    state_downloads: int = 0
    failed_state_downloads: int = 0
    declined_state_downloads: int = 0
    """State requests a donor declined, serving another download (``one_download_per_donor``): the next donor is tried."""
    request_calls: int = 0
    """Accelerator calls that served forward/backward/tail requests (one per batch)."""
    batched_requests: int = 0
    """Requests served by those calls (rejected ones included)."""
    staleness: StalenessStats = field(default_factory=StalenessStats)
    """Delays of the backwards served, and (with a weight history) how far the weights moved meanwhile."""
    failed_rounds: int = 0
    """All-reduces (gradient or state) that failed: a member's part missed its deadline, no mean came back, or (in a
    group) nothing of another member (the round then counts as no averaging round: a solo step, or no step)."""
    failed_rounds_in_a_row: int = 0
    """All-reduces (gradient or state) in a row that failed (as ``failed_rounds`` says)."""
    watchdog_exit: str | None = None
    """Why the watchdog made this peer exit (one of ``WATCHDOG_REASONS``); None while it runs."""
    refused_values: int = 0
    """Requests refused for non-finite values or values above ``max_abs_value`` (before anything of them ran)."""
    checkpoints_saved: int = 0
    failed_checkpoints: int = 0
    """Saves that failed (a full disk, a folder it may not write): the peer serves on; the last error is kept."""
    checkpoint_restores: int = 0
    """Starts from a checkpoint (0 or 1 per server: a peer that got no state from a ready peer of its stage)."""
    checkpoint_error: str | None = None
    """The last checkpoint save or restore that failed, and why."""


WATCHDOG_REASONS = ("failed_rounds", "failed_state_loads", "nan_gradients")
"""Why a watchdog exits a peer (the ``averaging.watchdog_*`` keys)."""


class OptimizerLock:
    """Node0's optimizer lock (``n0/server/module_collab.py``, ``n0/server/optim.py``): backwards hold it together,
    the end of an epoch (all-reduce, step, state averaging) holds it alone; an epoch end that waits for it goes
    before backwards that arrive later."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.backwards = 0
        self.averaging = False
        self._waiters: list[Future] = []

    @asynccontextmanager
    async def backward(self) -> AsyncIterator[None]:
        """Held while one backward runs."""
        while self.averaging:
            await self._changed()
        self.backwards += 1
        try:
            yield
        finally:
            self.backwards -= 1
            self._notify()

    async def hold_for_epoch_end(self) -> None:
        """Take it alone (release with :meth:`release_epoch_end`), once the backwards running have finished."""
        while self.averaging:
            await self._changed()
        self.averaging = True
        while self.backwards:
            await self._changed()

    def release_epoch_end(self) -> None:
        """Let backwards run again (nothing happens if it is not held)."""
        if self.averaging:
            self.averaging = False
            self._notify()

    async def _changed(self) -> None:
        waiter = self.rt.future()
        self._waiters.append(waiter)
        await waiter.wait()

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set_result(None)


@asynccontextmanager
async def _unlocked() -> AsyncIterator[None]:
    yield


@dataclass(frozen=True)
class _StampedWork:
    """A backward request's work and the epoch its forward response was stamped with."""

    work: Work
    epoch: int


class StageServer:
    """Serves forward/backward (and tail on the last stage) for one stage and runs its in-stage averaging."""

    def __init__(
        self,
        rt: Runtime,
        run_id: str,
        compute: StageCompute,
        averaging: AveragingConfig,
        *,
        throughput: float,
        bandwidth_mbps: float,
        seed: int = 0,
        max_batch_requests: int = 1,
        averager: AveragerFactory = GroupAverager,
        delay_history: int = 0,
        weight_stashing: bool = False,
        direct: DirectConfig | None = None,
        max_abs_value: float = math.inf,
        checkpoints: CheckpointStore | None = None,
    ):
        """``averager(rt, stage, cfg)`` builds the in-stage all-reduce (the protocol's own by default; a
        backend may supply another with the same ``serve``/``all_reduce``/``timeouts`` interface).

        ``delay_history`` > 0 keeps the flat weights of that many epochs (numerics mode only: the caller passes 0
        in timing mode), to measure the weight gap and look-ahead cosine of each backward; ``weight_stashing`` runs
        each backward with its forward's weights from that history (the caller checks the topology permits it).
        ``direct``: also serve the direct pipeline (:class:`DirectHops`). ``max_abs_value``: the largest |value| a
        request's activations or gradients may hold (``train.max_abs_value``, see ``bounds.py``). ``checkpoints``: save the
        stage's state there on its schedule, and start from it where the stage has no ready peer (``checkpoints.py``)."""
        self.rt = rt
        self.compute = compute
        self.stage = compute.index
        self.cfg = averaging
        self.seed = seed
        self.stats = ServerStats()
        self.requests = BatchingQueue(rt, self._run_batch, max_batch_requests)
        self.progress = ProgressTracker(rt, run_id, self.stage, averaging, throughput=throughput, bandwidth_mbps=bandwidth_mbps)
        self.matchmaker = Matchmaker(rt, run_id, self.stage, averaging, bandwidth_mbps)
        self.averager = averager(rt, self.stage, averaging)
        compress = averaging.powersgd_rank and not (averaging.powersgd_skip_tail and compute.is_tail)
        self.powersgd = PowerSGD(
            compute.parameter_shapes, averaging.powersgd_rank, averaging.powersgd_warm_start, _stable_hash(seed, self.stage, "Q")
        ) if compress else None
        rng = random.Random(_stable_hash(seed, rt.peer_id))
        self.state_transfer = StateTransfer(rt, compute, self.progress, averaging, rng, self.stats, self.powersgd)
        self.optimizer_lock = OptimizerLock(rt) if averaging.blocks_serving else None
        self._loops: list[Task] = []
        self.history = WeightHistory(delay_history) if delay_history else None
        self.weight_stashing = weight_stashing and self.history is not None
        self.direct = DirectHops(self, run_id, direct) if direct is not None else None
        self.max_abs_value = max_abs_value
        self.checkpoints = checkpoints

    @property
    def epoch(self) -> int:
        """The epoch this peer's weights are at."""
        return self.progress.epoch

    @property
    def samples(self) -> int:
        """Samples whose gradients were accumulated toward the next step."""
        return self.progress.samples

    @property
    def ready(self) -> bool:
        """Whether it serves (False until a joiner's state download is over)."""
        return self.progress.ready

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, load_state: bool = False) -> None:
        """Load state from the stage's peers if asked (a joiner); where no peer's state came, from the stage's checkpoint
        (if this peer keeps them); then serve and keep averaging.

        While it downloads, the peer is already announced (so the balancing rule counts it) but
        marked not ready (so trainers do not route to it and peers do not average with it).
        """
        progress = self.progress
        self._loops = [self.rt.spawn(progress.keep_reporting())]
        await progress.refresh()
        loaded = False
        if load_state and progress.others():
            await progress.report()
            loaded = await self.load_state_from_peers()
            if self.exited:
                return
            if self.cfg.join_waits_for_round:
                await self.state_transfer.wait_for_round_under(JOIN_RESUME_FRACTION)
        if not loaded and self.checkpoints is not None:  # no peer, or none answered (a crashed peer's record outlives it)
            await self.restore_checkpoint()
            if self.exited:
                return
        progress.ready = True
        self.rt.serve(FORWARD, self.handle_forward)
        self.rt.serve(BACKWARD, self.handle_backward)
        if self.compute.is_tail:  # the fused tail call; a trainer may also call the tail's forward and backward
            self.rt.serve(TAIL, self.handle_tail)
        self.rt.serve(GET_STATE, self.handle_get_state)
        self.rt.serve(PROBE, self.handle_probe)
        if self.direct is not None:
            self.direct.serve()
        self.averager.serve()
        await progress.report()
        self._loops.append(self.rt.spawn(self._epoch_loop()))

    async def leave(self) -> None:
        """Say goodbye: stop averaging and withdraw this peer's record so others stop counting on it."""
        for loop in self._loops:
            loop.cancel()
        await self.progress.withdraw()

    async def load_state_from_peers(self, attempts: int = 3) -> bool:
        """Download the stage's newest state from a peer (see :meth:`StateTransfer.load_state_from_peers`)."""
        loaded = await self.state_transfer.load_state_from_peers(attempts)
        limit = self.cfg.watchdog_failed_state_loads
        if limit and self.stats.failed_state_downloads >= limit:
            self.exit("failed_state_loads")
        return loaded

    async def restore_checkpoint(self) -> None:
        """Start from the stage's checkpoint, if one was saved. One that cannot be restored (unreadable, of another run,
        stage or model) exits the peer (``failed_state_loads``, as a failed download does in Node0) with the reason in
        ``stats.checkpoint_error``: starting afresh would overwrite it with the initial weights."""
        store = self.checkpoints

        def restore() -> bool:
            saved = store.load(self.stage)
            if saved is not None:
                try:
                    self.state_transfer.apply(saved)
                except ValueError as error:
                    raise CheckpointError(f"{store.path(self.stage)}: {error}") from None
            return saved is not None

        try:
            restored = await self.rt.compute(0.0, restore)
        except CheckpointError as error:
            self.stats.checkpoint_error = str(error)
            self.exit("failed_state_loads")
            return
        self.stats.checkpoint_restores += restored

    async def _save_checkpoint(self) -> None:
        """Save the stage's state; a failed save is counted (the peer serves on) and its error kept."""
        try:
            await self.rt.compute(0.0, lambda: self.checkpoints.save(self.stage, self.state_transfer.snapshot()))
        except CheckpointError as error:
            self.stats.failed_checkpoints += 1
            self.stats.checkpoint_error = str(error)
            return
        self.stats.checkpoints_saved += 1

    @property
    def exited(self) -> bool:
        """Whether the watchdog made this peer exit."""
        return self.stats.watchdog_exit is not None

    def exit(self, reason: str) -> None:
        """The watchdog's exit (Node0 kills its process): leave the stage and refuse every request from now on."""
        if not self.exited:
            self.stats.watchdog_exit = reason
            self.rt.spawn(self.leave())

    # ---- serving ---------------------------------------------------------------------------
    def token_ids(self, request: Any) -> Any:
        """The micro-batch's tokens: the head's own input, or the side channel sent with the activations."""
        return request.inputs if self.compute.is_head else request.token_ids

    def check_request(self, request: Any, cls: type) -> None:
        """Refuse, naming the problem, a request of another class, with mistyped fields, for another stage, with a
        negative epoch stamp, or whose activations or gradients are not finite or above ``max_abs_value``, and every
        request once the watchdog made this server exit."""
        check_message(request, cls)
        if self.exited:
            raise ValueError(f"the server of stage {self.stage} exited ({self.stats.watchdog_exit})")
        if request.stage != self.stage:
            raise ValueError(f"request for stage {request.stage} sent to a server of stage {self.stage}")
        if isinstance(request, BackwardRequest) and request.epoch < 0:  # its delay, epoch - stamp, would size the delay counts
            raise ValueError(f"BackwardRequest.epoch: must be >= 0, got {request.epoch}")
        try:
            check_message_values(request, self.max_abs_value)
        except ValueError:
            self.stats.refused_values += 1
            raise

    async def handle_forward(self, caller: str, request: ForwardRequest) -> ForwardResponse:
        """Forward pass, stamped with this epoch; nothing of the request is kept for the backward pass (with a weight
        history, this epoch's weights are). The tail given targets returns the per-token loss."""
        self.check_request(request, ForwardRequest)
        outputs, epoch = await self.run_forward(Work(request.inputs, self.token_ids(request), targets=request.targets))
        return ForwardResponse(outputs, epoch)

    async def handle_backward(self, caller: str, request: BackwardRequest) -> BackwardResponse:
        """Recompute the forward pass from the resent input (on the tail, its per-token loss), then backward."""
        self.check_request(request, BackwardRequest)
        work = Work(request.inputs, self.token_ids(request), grad_outputs=request.grad_outputs, targets=request.targets,
                    accumulate=request.accumulate)
        return BackwardResponse(await self.run_backward(work, request.epoch, _once_key(caller, request.request_id)))

    async def handle_tail(self, caller: str, request: TailRequest) -> TailResponse:
        """Forward, loss and backward of the last stage."""
        self.check_request(request, TailRequest)
        work = Work(request.inputs, self.token_ids(request), targets=request.targets, accumulate=request.accumulate)
        loss, grad_inputs = await self.run_tail(work, _once_key(caller, request.request_id))
        return TailResponse(loss, grad_inputs)

    async def run_forward(self, work: Work) -> tuple[Payload, int]:
        """The forward pass of ``work`` and the epoch of the weights that ran it."""
        return await self.requests.submit(FORWARD, work, self.compute.forward_cost(work.inputs))

    async def run_backward(self, work: Work, epoch: int, key: Hashable | None) -> Payload | None:
        """The input gradient of ``work`` (its forward recomputed; ``epoch``: its forward's stamp), accumulated once per
        ``key``; then the epoch ends if this peer is alone and the target is reached."""
        async with self._backward_lock():
            grad_inputs = await self.requests.submit(BACKWARD, _StampedWork(work, epoch), self.compute.backward_cost(work.inputs), key)
        await self._end_epoch_if_alone_and_due()
        return grad_inputs

    async def run_tail(self, work: Work, key: Hashable | None) -> tuple[float | None, Payload | None]:
        """The last stage's forward, loss and backward of ``work`` (accumulated once per ``key``): loss and input gradient."""
        async with self._backward_lock():
            result = await self.requests.submit(TAIL, work, self.compute.backward_cost(work.inputs), key)
        await self._end_epoch_if_alone_and_due()
        return result

    async def handle_get_state(self, caller: str, request: StateRequest) -> StateResponse:
        """Send this peer's parameters and optimizer state to a joiner."""
        self.check_request(request, StateRequest)
        return await self.state_transfer.export()

    async def handle_probe(self, caller: str, request: ProbeRequest) -> ProbeResponse:
        """Answer a trainer's probe: this server serves ``request.stage`` (another stage is refused)."""
        self.check_request(request, ProbeRequest)
        return ProbeResponse(self.stage)

    def _backward_lock(self) -> Any:
        """The optimizer lock's shared side with ``blocks_serving``; nothing to wait for without."""
        return self.optimizer_lock.backward() if self.optimizer_lock else _unlocked()

    def _run_batch(self, kind: str, items: list[Any]) -> list[Any]:
        """Results (or ValueErrors) of one call; samples whose gradients were accumulated are counted in the same slot.

        A forward's result is ``(outputs, epoch)``: the epoch of the weights it ran with, as this call saw it.
        """
        self.stats.request_calls += 1
        self.stats.batched_requests += len(items)
        if kind == FORWARD:
            self._record_weights()
            return [r if isinstance(r, Exception) else (r, self.epoch) for r in self.compute.forward_batch(items)]
        # the fused tail's forward and backward are one call: its delay is 0 by construction
        stamped = items if kind == BACKWARD else [_StampedWork(work, self.epoch) for work in items]
        results = self._backward_batch(stamped) if kind == BACKWARD else self.compute.tail_batch(items)
        current = self.compute.parameter_values(None) if self.history is not None else None
        for item, result in zip(stamped, results):
            if not isinstance(result, Exception) and item.work.accumulate:
                samples = leading_dims(item.work.inputs)[0]
                self.progress.count(samples)
                self.stats.samples += samples
                self._measure_staleness(item.epoch, current)
        return results

    def _record_weights(self) -> None:
        """Keep the weights of this epoch in the history (if there is one and they are not kept yet)."""
        if self.history is not None and self.epoch not in self.history:
            self.history.record(self.epoch, self.compute.parameter_values(None))

    def _measure_staleness(self, forward_epoch: int, current: Payload | None) -> None:
        """Count a backward's delay (a forward served by a peer ahead of this one counts as 0) and, with a history,
        the weight gap to its forward's weights and the cosine with the last update."""
        staleness = self.stats.staleness
        staleness.count_delay(max(0, self.epoch - forward_epoch))
        forward = self.history.get(forward_epoch) if self.history is not None else None
        if current is not None and forward is not None:
            staleness.measure(current, forward, self.history.get(self.epoch - 1))

    def _backward_batch(self, items: list[_StampedWork]) -> list[Any]:
        """Backward of several requests; with weight stashing, each group of one forward epoch runs with that
        epoch's weights and the current ones are restored after (gradients accumulate the same way)."""
        if not self.weight_stashing:
            return self.compute.backward_batch([item.work for item in items])
        results: list[Any] = [None] * len(items)
        current = self.compute.parameter_values(None)
        for epoch in sorted({item.epoch for item in items}):
            stashed = self.history.get(epoch)
            if stashed is None:
                raise RuntimeError(
                    f"stage {self.stage}: the weights of epoch {epoch} are no longer kept at epoch {self.epoch}; "
                    f"topology.weight_stashing needs train.delay_history (now {self.history.length}) above the largest delay"
                )
            indices = [i for i, item in enumerate(items) if item.epoch == epoch]
            self.compute.set_parameter_values(stashed, None)
            try:
                for i, result in zip(indices, self.compute.backward_batch([items[i].work for i in indices])):
                    results[i] = result
            finally:
                self.compute.set_parameter_values(current, None)
        return results

    # ---- epochs and averaging --------------------------------------------------------------
    async def _end_epoch_if_alone_and_due(self) -> None:
        """Without other peers, step as soon as the target is reached (exact synchronous updates)."""
        progress = self.progress
        if progress.ending_epoch is None and progress.samples >= self.cfg.target_batch_size and progress.alone():
            await self._end_epoch()

    async def _epoch_loop(self) -> None:
        progress = self.progress
        while not self.exited:
            await progress.refresh()
            if progress.global_epoch() - progress.epoch > self.cfg.max_allowed_stale:
                await self.load_state_from_peers()
            elif progress.ending_epoch is None and progress.epoch_due():
                await self._end_epoch()
            else:
                await self.rt.sleep(min(progress.next_check_in(), self.cfg.auto_step_s or self.cfg.progress_period_s))

    async def _end_epoch(self) -> None:
        progress = self.progress
        progress.ending_epoch = progress.epoch
        try:
            epoch, target_epoch = progress.epoch, progress.global_epoch()
            if not progress.alone():
                await progress.report()  # tell the stage: peers at this epoch join the round now
            gradients, samples = await self.rt.compute(0.0, self._take_gradients)
            if self.cfg.watchdog_nan_gradients and not all_finite(gradients):
                self.exit("nan_gradients")
                return
            announced = {peer: r.time for peer, r in progress.others().items() if r.averaging == epoch}
            members, bandwidths = self.matchmaker.alone() if progress.alone() else await self.matchmaker.form_group(epoch, announced)
            if self.optimizer_lock:
                await self.optimizer_lock.hold_for_epoch_end()
            timeouts = self.averager.timeouts
            if self.powersgd is not None and len(members) > 1:
                mean, contributors = await self.powersgd.average(
                    self.averager, f"grad/{epoch}", members, bandwidths, gradients, samples,
                    _stable_hash(self.seed, self.stage, epoch),
                )
            else:
                mean, contributors = await self.averager.all_reduce(f"grad/{epoch}", members, bandwidths, gradients, samples)
            self._watch_round(mean, contributors, len(members), timeouts, had_samples=samples > 0)
            if mean is not None:
                delay = mean_delay(self.stats.staleness.delay_counts)
                await self.rt.compute(self.compute.step_cost(), lambda: self.compute.step_with(mean, delay))
            elif target_epoch > epoch and progress.others():
                # nothing to step with while the stage moved on (a joiner whose download raced the donor's
                # step): jumping to the stage's epoch would leave this peer an update behind; fetch the state
                await self.load_state_from_peers()
                target_epoch = max(target_epoch, progress.epoch)
            self.stats.last_group_size = contributors
            if mean is not None and contributors > 1:
                self.stats.averaging_rounds += 1
                progress.saw(members)
            elif mean is not None:
                self.stats.solo_steps += 1
            progress.epoch = max(epoch + 1, target_epoch)
            self.stats.epochs += 1
            if self.cfg.average_state_every and progress.epoch % self.cfg.average_state_every == 0 and len(members) > 1:
                await self._average_parameters(members, bandwidths)
            if self.optimizer_lock:
                self.optimizer_lock.release_epoch_end()
            if self.history is not None:  # the weights this epoch's forwards will use (state averaging included)
                self.history.record(progress.epoch, self.compute.parameter_values(None))
            if self.checkpoints is not None and mean is not None and self.checkpoints.due(progress.epoch):  # a step was made
                await self._save_checkpoint()
            await progress.report()
        finally:
            if self.optimizer_lock:
                self.optimizer_lock.release_epoch_end()
            progress.ending_epoch = None

    def _watch_round(self, mean: Payload | None, contributors: int, group_size: int, timeouts_before: int, *,
                     had_samples: bool) -> None:
        """Count failed all-reduces, gradient and state rounds alike (Node0's ``n0/utils/monitor.py``: a timeout or no
        result fails a round, a success resets the count in a row; a group of one is a success, as Node0's matchmaking
        forms it; in a group, a result with nothing of another member fails too); exit at the limit.

        A gradient round in which this peer had no samples and got no mean back, without a timeout, is empty, not
        failed: nobody in the group had samples (the stage's rate estimate ran on after its trainers stopped, so
        epochs came due) and there is nothing to step with: it leaves the counts as they are."""
        timed_out = self.averager.timeouts > timeouts_before
        if mean is None and not had_samples and not timed_out:
            return
        failed = mean is None or timed_out or (group_size > 1 and contributors < 2)
        stats = self.stats
        stats.failed_rounds += failed
        stats.failed_rounds_in_a_row = stats.failed_rounds_in_a_row + 1 if failed else 0
        limit = self.cfg.watchdog_failed_rounds
        if limit and stats.failed_rounds_in_a_row >= limit:
            self.exit("failed_rounds")

    def _take_gradients(self) -> tuple[Payload, int]:
        samples, self.progress.samples = self.progress.samples, 0
        return self.compute.take_gradients(), samples

    async def _average_parameters(self, members: list[str], bandwidths: list[float]) -> None:
        """SPARTA: average a fraction of the parameters, the same entries on every member: random ones
        (``state_averaging=random``), or the next part of a fixed partition together with the optimizer state
        at those entries (``partition``: Node0's ``n0/server/state_averager_wrap.py``, part epoch / every)."""
        compute = self.compute
        if self.cfg.state_averaging == "partition":
            part = self.epoch // self.cfg.average_state_every
            index = compute.partition_index(self.cfg.num_partitions, part, _stable_hash(self.seed, self.stage))
            read, write = compute.state_values, compute.set_state_values
        else:
            index = compute.sparta_index(self.cfg.sparta_fraction, _stable_hash(self.seed, self.stage, self.epoch))
            read, write = compute.parameter_values, compute.set_parameter_values
        values = await self.rt.compute(0.0, lambda: read(index))
        timeouts = self.averager.timeouts
        mean, contributors = await self.averager.all_reduce(f"state/{self.epoch}", members, bandwidths, values, 1.0)
        self._watch_round(mean, contributors, len(members), timeouts, had_samples=True)  # parameters: always values
        if mean is not None and contributors > 1:
            await self.rt.compute(0.0, lambda: write(mean, index))
            self.stats.state_averaging_rounds += 1


def _once_key(caller: str, request_id: int) -> tuple[str, int] | None:
    """The key under which a backward or tail request is accumulated at most once (None: the caller sent no id)."""
    return (caller, request_id) if request_id else None


def _stable_hash(*parts: Any) -> int:
    """A seed derived from ``parts`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")
