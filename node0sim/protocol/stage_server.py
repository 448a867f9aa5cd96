"""A stage server: serves forward/backward/tail for one pipeline stage and updates its weights."""

from __future__ import annotations

from typing import Any

from node0sim.protocol.messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    TailRequest,
    TailResponse,
    leading_dims,
)
from node0sim.protocol.stage_compute import StageCompute
from node0sim.runtime import Runtime


def stage_key(run_id: str, stage: int) -> str:
    """DHT key under which the servers of ``stage`` announce themselves (one subkey per peer)."""
    return f"{run_id}/stage/{stage}"


class StageServer:
    """Serves one stage; steps the optimizer whenever ``update_every_samples`` samples have been backpropagated."""

    def __init__(
        self,
        rt: Runtime,
        run_id: str,
        compute: StageCompute,
        update_every_samples: int,
        announce_period_s: float = 30.0,
    ):
        if update_every_samples < 1:
            raise ValueError(f"update_every_samples must be >= 1, got {update_every_samples}")
        self.rt = rt
        self.run_id = run_id
        self.compute = compute
        self.stage = compute.index
        self.update_every_samples = update_every_samples
        self.announce_period_s = announce_period_s
        self.samples_accumulated = 0
        self.requests_served = 0
        self._update_pending = False

    async def start(self) -> None:
        """Register the handlers, announce this peer in the DHT and keep the announcement fresh."""
        self.rt.serve("forward", self.handle_forward)
        self.rt.serve("tail" if self.compute.is_tail else "backward",
                      self.handle_tail if self.compute.is_tail else self.handle_backward)
        await self._announce()
        self.rt.spawn(self._keep_announcing())

    async def _announce(self) -> None:
        record = {"stage": self.stage, "updates": self.compute.updates}
        await self.rt.dht_store(
            stage_key(self.run_id, self.stage), record, expires_in=3 * self.announce_period_s, subkey=self.rt.peer_id
        )

    async def _keep_announcing(self) -> None:
        while True:
            await self.rt.sleep(self.announce_period_s)
            await self._announce()

    def _token_ids(self, request: ForwardRequest | BackwardRequest | TailRequest) -> Any:
        """The micro-batch's tokens: the head's own input, or the side channel sent with the activations."""
        return request.inputs if self.compute.is_head else request.token_ids

    def _check_stage(self, stage: int) -> None:
        if stage != self.stage:
            raise ValueError(f"request for stage {stage} sent to a server of stage {self.stage}")

    async def handle_forward(self, caller: str, request: ForwardRequest) -> ForwardResponse:
        """Forward pass; nothing is kept for the backward pass."""
        self._check_stage(request.stage)
        outputs = await self.rt.compute(
            self.compute.forward_flops(request.inputs), lambda: self.compute.forward(request.inputs, self._token_ids(request))
        )
        self.requests_served += 1
        return ForwardResponse(outputs)

    async def handle_backward(self, caller: str, request: BackwardRequest) -> BackwardResponse:
        """Recompute the forward pass from the resent input, then backward."""
        self._check_stage(request.stage)
        grad_inputs = await self.rt.compute(
            self.compute.backward_flops(request.inputs),
            lambda: self._counted(request.inputs, self.compute.backward(request.inputs, self._token_ids(request), request.grad_outputs)),
        )
        await self._maybe_update()
        return BackwardResponse(grad_inputs)

    async def handle_tail(self, caller: str, request: TailRequest) -> TailResponse:
        """Forward, loss and backward of the last stage."""
        self._check_stage(request.stage)
        loss, grad_inputs = await self.rt.compute(
            self.compute.backward_flops(request.inputs),
            lambda: self._counted(request.inputs, self.compute.tail(request.inputs, self._token_ids(request), request.targets)),
        )
        await self._maybe_update()
        return TailResponse(loss, grad_inputs)

    def _counted(self, inputs: Any, result: Any) -> Any:
        """Count the samples whose gradients were just accumulated (in the same compute slot)."""
        self.samples_accumulated += leading_dims(inputs)[0]
        self.requests_served += 1
        return result

    async def _maybe_update(self) -> None:
        if self._update_pending or self.samples_accumulated < self.update_every_samples:
            return
        self._update_pending = True
        try:
            await self.rt.compute(self.compute.step_flops(), self._update)
        finally:
            self._update_pending = False

    def _update(self) -> None:
        self.compute.apply_update(self.samples_accumulated)
        self.samples_accumulated = 0
