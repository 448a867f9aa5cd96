"""A stage server: serves one pipeline stage and keeps its weights in step with the stage's other peers.

Requests of the same kind (forward, backward, tail) that wait for the accelerator are merged into
one call of up to ``max_batch_requests`` requests, as hivemind's task pools batch expert calls.

Per epoch (``averaging.target_batch_size`` samples across the stage's peers) the peers that are
ready average their gradients (sample-weighted) and step; every ``average_state_every`` epochs
they also average a random fraction of their parameters (SPARTA); a peer that falls more than
``max_allowed_stale`` epochs behind, or joins, downloads the stage's state from a peer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable

from node0sim.protocol.averaging import AveragingConfig, GroupAverager, group_key
from node0sim.protocol.powersgd import PowerSGD
from node0sim.protocol.messages import (
    HEADER_BYTES,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    Payload,
    TailRequest,
    TailResponse,
    leading_dims,
    payload_bytes,
)
from node0sim.protocol.stage_compute import StageCompute, Work
from node0sim.runtime import Future, RPCError, Runtime, Task


def stage_key(run_id: str, stage: int) -> str:
    """DHT key under which the servers of ``stage`` report themselves (one subkey per peer)."""
    return f"{run_id}/stage/{stage}"


@dataclass(frozen=True)
class StateRequest:
    """Ask a peer for its stage state."""

    stage: int

    def wire_bytes(self) -> int:
        return HEADER_BYTES


@dataclass(frozen=True)
class StateResponse:
    """A stage's parameters and optimizer state at ``epoch``."""

    epoch: int
    state: Payload

    def wire_bytes(self) -> int:
        return HEADER_BYTES + payload_bytes(self.state)


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
    request_calls: int = 0
    """Accelerator calls that served forward/backward/tail requests (one per batch)."""
    batched_requests: int = 0
    """Requests served by those calls (rejected ones included)."""


@dataclass(eq=False)
class _Job:
    """A request waiting for the accelerator, and where its result goes."""

    kind: str
    work: Work
    flops: float
    result: Future


class StageServer:
    """Serves forward/backward (or tail) for one stage and runs its in-stage averaging."""

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
        averager: Callable[[Runtime, int, AveragingConfig], Any] = GroupAverager,
    ):
        """``averager(rt, stage, cfg)`` builds the in-stage all-reduce (the protocol's own by default; a
        backend may supply another with the same ``serve``/``all_reduce``/``timeouts`` interface)."""
        if max_batch_requests < 1:
            raise ValueError(f"max_batch_requests must be >= 1, got {max_batch_requests}")
        self.rt = rt
        self.run_id = run_id
        self.compute = compute
        self.stage = compute.index
        self.cfg = averaging
        self.throughput = throughput
        self.bandwidth_mbps = bandwidth_mbps
        self.seed = seed
        self.max_batch_requests = max_batch_requests
        self._queue: list[_Job] = []
        self._dispatching = False
        self.rng = random.Random(_stable_hash(seed, rt.peer_id))
        self.averager = averager(rt, self.stage, averaging)
        self.powersgd = PowerSGD(compute.parameter_shapes, averaging.powersgd_rank) if averaging.powersgd_rank else None
        self.epoch = 0
        self.samples = 0
        self.stats = ServerStats()
        self.records: dict[str, dict[str, Any]] = {}
        """The stage's DHT records as last read; replaced, never changed in place (``_others`` caches on it)."""
        self._others_of: dict[str, dict[str, Any]] | None = None
        self._others_cache: dict[str, dict[str, Any]] = {}
        self._ending_epoch = False
        self._rate = 0.0
        self._last_report = (0.0, 0)
        self._loops: list[Task] = []
        self.ready = False

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, load_state: bool = False) -> None:
        """Load state from the stage's peers if asked (a joiner), then serve and keep averaging.

        While it downloads, the peer is already announced (so the balancing rule counts it) but
        marked not ready (so trainers do not route to it and peers do not average with it).
        """
        self._loops = [self.rt.spawn(self._heartbeat())]
        self.records = await self._read_records()
        if load_state and self._others():
            await self._report()
            await self.load_state_from_peers()
        self.ready = True
        self.rt.serve("forward", self.handle_forward)
        if self.compute.is_tail:
            self.rt.serve("tail", self.handle_tail)
        else:
            self.rt.serve("backward", self.handle_backward)
        self.rt.serve("get_state", self.handle_get_state)
        self.averager.serve()
        await self._report()
        self._loops.append(self.rt.spawn(self._epoch_loop()))

    async def leave(self) -> None:
        """Say goodbye: stop averaging and withdraw this peer's record so others stop counting on it."""
        for loop in self._loops:
            loop.cancel()
        await self.rt.dht_store(stage_key(self.run_id, self.stage), None, expires_in=0.0, subkey=self.rt.peer_id)

    # ---- serving ---------------------------------------------------------------------------
    def _token_ids(self, request: ForwardRequest | BackwardRequest | TailRequest) -> Any:
        """The micro-batch's tokens: the head's own input, or the side channel sent with the activations."""
        return request.inputs if self.compute.is_head else request.token_ids

    def _check_stage(self, stage: int) -> None:
        if stage != self.stage:
            raise ValueError(f"request for stage {stage} sent to a server of stage {self.stage}")

    async def handle_forward(self, caller: str, request: ForwardRequest) -> ForwardResponse:
        """Forward pass; nothing is kept for the backward pass."""
        self._check_stage(request.stage)
        work = Work(request.inputs, self._token_ids(request))
        return ForwardResponse(await self._serve("forward", work, self.compute.forward_flops(request.inputs)))

    async def handle_backward(self, caller: str, request: BackwardRequest) -> BackwardResponse:
        """Recompute the forward pass from the resent input, then backward."""
        self._check_stage(request.stage)
        work = Work(request.inputs, self._token_ids(request), grad_outputs=request.grad_outputs)
        grad_inputs = await self._serve("backward", work, self.compute.backward_flops(request.inputs))
        await self._end_epoch_if_alone_and_due()
        return BackwardResponse(grad_inputs)

    async def handle_tail(self, caller: str, request: TailRequest) -> TailResponse:
        """Forward, loss and backward of the last stage."""
        self._check_stage(request.stage)
        work = Work(request.inputs, self._token_ids(request), targets=request.targets)
        loss, grad_inputs = await self._serve("tail", work, self.compute.backward_flops(request.inputs))
        await self._end_epoch_if_alone_and_due()
        return TailResponse(loss, grad_inputs)

    async def _serve(self, kind: str, work: Work, flops: float) -> Any:
        """One request's result: computed alone (``max_batch_requests`` 1) or in a batch; a rejection is raised."""
        if self.max_batch_requests == 1:
            (result,) = await self.rt.compute(flops, lambda: self._run_batch(kind, [work]))
        else:
            job = _Job(kind, work, flops, self.rt.future())
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
                works = [job.work for job in batch]
                try:
                    results = await self.rt.compute(sum(job.flops for job in batch), lambda: self._run_batch(kind, works))
                except Exception as error:  # not a malformed request (those come back as results): fail the batch
                    results = [error] * len(batch)
                for job, result in zip(batch, results):
                    job.result.set_result(result)
        finally:
            self._dispatching = False

    def _run_batch(self, kind: str, works: list[Work]) -> list[Any]:
        """Results (or ValueErrors) of one call; samples whose gradients were accumulated are counted in the same slot."""
        self.stats.request_calls += 1
        self.stats.batched_requests += len(works)
        run: Callable[[list[Work]], list[Any]] = {
            "forward": self.compute.forward_batch, "backward": self.compute.backward_batch, "tail": self.compute.tail_batch,
        }[kind]
        results = run(works)
        if kind != "forward":
            for work, result in zip(works, results):
                if not isinstance(result, Exception):
                    self._count(leading_dims(work.inputs)[0])
        return results

    def _count(self, samples: int) -> None:
        self.samples += samples
        self.stats.samples += samples

    async def handle_get_state(self, caller: str, request: StateRequest) -> StateResponse:
        """Send this peer's parameters and optimizer state to a joiner."""
        self._check_stage(request.stage)
        state = await self.rt.compute(0.0, self.compute.export_state)
        return StateResponse(self.epoch, state)

    # ---- epochs and averaging --------------------------------------------------------------
    def _others(self) -> dict[str, dict[str, Any]]:
        """The stage's other peers that serve (joiners still downloading their state are left out)."""
        records = self.records
        if self._others_of is not records:  # recomputed only when ``self.records`` was reassigned
            me = self.rt.peer_id
            self._others_cache = {peer: r for peer, r in records.items() if peer != me and r["ready"]}
            self._others_of = records
        return self._others_cache

    async def _read_records(self) -> dict[str, dict[str, Any]]:
        records = await self.rt.dht_get(stage_key(self.run_id, self.stage))
        return {p: r for p, r in records.items() if r is not None} if isinstance(records, dict) else {}

    async def _report(self) -> None:
        now = self.rt.now()
        last_time, last_samples = self._last_report
        if now > last_time:
            self._rate = 0.5 * self._rate + 0.5 * (self.stats.samples - last_samples) / (now - last_time)
        self._last_report = (now, self.stats.samples)
        record = {
            "epoch": self.epoch, "samples": self.samples, "rate": self._rate, "time": now,
            "throughput": self.throughput, "bandwidth": self.bandwidth_mbps, "ready": self.ready,
            "averaging": self.epoch if self._ending_epoch else None,
        }
        await self.rt.dht_store(
            stage_key(self.run_id, self.stage), record, expires_in=3 * self.cfg.progress_period_s, subkey=self.rt.peer_id
        )

    def _global_epoch(self) -> int:
        return max([r["epoch"] for r in self._others().values()] + [self.epoch])

    def _estimated_samples(self) -> float:
        """Samples the stage has accumulated at this peer's epoch (others extrapolated from their reports)."""
        now = self.rt.now()
        others = sum(
            r["samples"] + r["rate"] * (now - r["time"]) for r in self._others().values() if r["epoch"] == self.epoch
        )
        return self.samples + others

    def _epoch_due(self) -> bool:
        """Another peer is ahead, or already averaging this epoch (join it), or the target is reached."""
        others = self._others().values()
        if any(r["epoch"] > self.epoch for r in others):
            return True
        if any(r.get("averaging") == self.epoch for r in others):
            return True
        now = self.rt.now()
        estimated = self.samples + sum(r["samples"] + r["rate"] * (now - r["time"]) for r in others if r["epoch"] == self.epoch)
        return estimated >= self.cfg.target_batch_size

    async def _end_epoch_if_alone_and_due(self) -> None:
        """Without other peers, step as soon as the target is reached (exact synchronous updates)."""
        if not self._ending_epoch and self.samples >= self.cfg.target_batch_size and not self._others():
            await self._end_epoch()

    async def _heartbeat(self) -> None:
        """Keep this peer's record fresh, even while it is busy averaging or downloading."""
        while True:
            await self.rt.sleep(self.cfg.progress_period_s)
            await self._report()

    async def _epoch_loop(self) -> None:
        while True:
            self.records = await self._read_records()
            if self._global_epoch() - self.epoch > self.cfg.max_allowed_stale:
                await self.load_state_from_peers()
            elif not self._ending_epoch and self._epoch_due():
                await self._end_epoch()
            else:
                await self.rt.sleep(self._next_check_in())

    def _next_check_in(self) -> float:
        rate = self._rate + sum(r["rate"] for r in self._others().values() if r["epoch"] == self.epoch)
        missing = self.cfg.target_batch_size - self._estimated_samples()
        eta = missing / rate if rate > 0 else self.cfg.progress_period_s
        return min(self.cfg.progress_period_s, max(eta, 0.01 * self.cfg.progress_period_s))

    async def _end_epoch(self) -> None:
        self._ending_epoch = True
        try:
            epoch, target_epoch = self.epoch, self._global_epoch()
            if self._others():
                await self._report()  # tell the stage: peers at this epoch join the round now
            gradients, samples = await self.rt.compute(0.0, self._take_gradients)
            members, bandwidths = await self._matchmake(epoch)
            if self.powersgd is not None and len(members) > 1:
                mean, contributors = await self.powersgd.average(
                    self.averager, f"grad/{epoch}", members, bandwidths, gradients, samples,
                    _stable_hash(self.seed, self.stage, epoch),
                )
            else:
                mean, contributors = await self.averager.all_reduce(f"grad/{epoch}", members, bandwidths, gradients, samples)
            if mean is not None:
                await self.rt.compute(self.compute.step_flops(), lambda: self.compute.step_with(mean))
            elif target_epoch > epoch and self._others():
                # nothing to step with while the stage moved on (a joiner whose download raced the donor's
                # step): jumping to the stage's epoch would leave this peer an update behind; fetch the state
                await self.load_state_from_peers()
                target_epoch = max(target_epoch, self.epoch)
            self.stats.last_group_size = contributors
            if contributors > 1:
                self.stats.averaging_rounds += 1
            else:
                self.stats.solo_steps += 1
            self.epoch = max(epoch + 1, target_epoch)
            self.stats.epochs += 1
            if self.cfg.average_state_every and self.epoch % self.cfg.average_state_every == 0 and len(members) > 1:
                await self._average_parameters(members, bandwidths)
            await self._report()
        finally:
            self._ending_epoch = False

    def _take_gradients(self) -> tuple[Payload, int]:
        samples, self.samples = self.samples, 0
        return self.compute.take_gradients(), samples

    async def _matchmake(self, epoch: int) -> tuple[list[str], list[float]]:
        """The group for this epoch: peers registered within ``matchmaking_time_s`` of the first."""
        me = self.rt.peer_id
        if not self._others():
            return [me], [self.bandwidth_mbps]
        key = group_key(self.run_id, self.stage, epoch)
        ttl = self.cfg.matchmaking_time_s + self.cfg.averaging_timeout_s
        await self.rt.dht_store(key, {"time": self.rt.now(), "bandwidth": self.bandwidth_mbps}, expires_in=ttl, subkey=me)
        group = await self.rt.dht_get(key) or {}
        deadline = min(r["time"] for r in group.values()) + self.cfg.matchmaking_time_s
        await self.rt.sleep(max(0.0, deadline + self.cfg.matchmaking_slack_s - self.rt.now()))
        group = await self.rt.dht_get(key) or {}
        members = sorted(peer for peer, r in group.items() if r["time"] <= deadline)
        if me not in members:
            return [me], [self.bandwidth_mbps]
        return members, [group[peer]["bandwidth"] for peer in members]

    async def _average_parameters(self, members: list[str], bandwidths: list[float]) -> None:
        """SPARTA: average a random fraction of the parameters, the same entries on every member."""
        index = self.compute.sparta_index(self.cfg.sparta_fraction, _stable_hash(self.seed, self.stage, self.epoch))
        values = await self.rt.compute(0.0, lambda: self.compute.parameter_values(index))
        mean, contributors = await self.averager.all_reduce(f"state/{self.epoch}", members, bandwidths, values, 1.0)
        if mean is not None and contributors > 1:
            await self.rt.compute(0.0, lambda: self.compute.set_parameter_values(mean, index))
            self.stats.state_averaging_rounds += 1

    async def load_state_from_peers(self, attempts: int = 3) -> bool:
        """Download parameters, optimizer state and epoch from an up-to-date peer (random, so joiners spread).

        A state taken while its donor is averaging is one step old by the time it lands, so the peer
        first waits for a running round to finish, and downloads again (up to ``attempts`` times) if
        the stage moved to a newer epoch while the state was in flight.
        """
        loaded = False
        for _ in range(attempts):
            self.records = await self._read_records()
            if self._newest_epoch_is_averaging():
                await self.rt.sleep(self.cfg.progress_period_s)
                self.records = await self._read_records()
            others = self._others()
            newest = max((r["epoch"] for r in others.values()), default=-1)
            if loaded and newest <= self.epoch:
                break
            candidates = sorted(peer for peer, r in others.items() if r["epoch"] == newest)
            self.rng.shuffle(candidates)
            loaded = await self._download_from(candidates[:3]) or loaded
        return loaded

    def _newest_epoch_is_averaging(self) -> bool:
        others = self._others().values()
        newest = max((r["epoch"] for r in others), default=-1)
        return any(r["epoch"] == newest and r.get("averaging") is not None for r in others)

    async def _download_from(self, donors: list[str]) -> bool:
        for donor in donors:
            try:
                response = await self.rt.call(donor, "get_state", StateRequest(self.stage), self.cfg.state_timeout_s)
            except RPCError:
                self.stats.failed_state_downloads += 1
                continue
            await self.rt.compute(0.0, lambda: self._import(response))
            self.stats.state_downloads += 1
            return True
        return False

    def _import(self, response: StateResponse) -> None:
        self.compute.import_state(response.state)
        self.compute.take_gradients()
        self.samples = 0
        self.epoch = response.epoch


def _stable_hash(*parts: Any) -> int:
    """A seed derived from ``parts`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")
