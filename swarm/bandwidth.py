"""A server measures its uplink at join, so that it announces what its link carries rather than its config.

The probe: two calls to the bootstrap's ``bandwidth_probe`` method (a sink that answers with one byte),
one of ``PROBE_SMALL_BYTES`` and one of ``swarm.bandwidth_probe_mb``; the uplink estimate is the extra bytes
over the extra time, ``8 (big - small) / (t_big - t_small)``, which cancels the round trip and the fixed
per-call cost. It measures the path to the bootstrap (the smaller of this uplink and the bootstrap's
downlink), one TCP stream (a window / RTT limit shows up too) in slow start if the connection is cold.
"""

from __future__ import annotations

import logging
import time

import torch

from node0sim.protocol.messages import ForwardRequest, ForwardResponse
from node0sim.runtime import RPCError
from swarm.runtime import LiveRuntime

log = logging.getLogger("node0sim.swarm")

PROBE = "bandwidth_probe"
PROBE_SMALL_BYTES = 1
PROBE_TIMEOUT_S = 120.0


def serve_probe(rt: LiveRuntime) -> None:
    """Answer bandwidth probes (the bootstrap does): read the bytes, reply with one byte."""

    async def sink(_caller: str, _request: ForwardRequest) -> ForwardResponse:
        return ForwardResponse(torch.zeros(1, dtype=torch.uint8))

    rt.serve(PROBE, sink)


async def _timed_call(rt: LiveRuntime, peer: str, nbytes: int) -> float:
    request = ForwardRequest(0, torch.zeros(nbytes, dtype=torch.uint8))
    start = time.perf_counter()
    await rt.call(peer, PROBE, request, PROBE_TIMEOUT_S)
    return time.perf_counter() - start


async def measure_uplink_mbps(rt: LiveRuntime, peer: str, probe_bytes: int) -> float | None:
    """Uplink estimate in Mb/s from timed probes to ``peer``; None if the probe failed or was inconclusive."""
    try:
        await _timed_call(rt, peer, PROBE_SMALL_BYTES)  # opens the connection
        small = await _timed_call(rt, peer, PROBE_SMALL_BYTES)
        big = await _timed_call(rt, peer, probe_bytes)
    except (RPCError, TimeoutError) as error:
        log.warning("bandwidth probe to %s failed: %s", peer, error)
        return None
    if big <= small:
        return None
    return 8 * (probe_bytes - PROBE_SMALL_BYTES) / (big - small) / 1e6


async def announced_uplink_mbps(rt: LiveRuntime, bootstrap_peer: str | None, configured_mbps: float, probe_mb: float) -> float:
    """The uplink a server announces: measured against the bootstrap, or the configured one with a warning."""
    if probe_mb <= 0:
        return configured_mbps
    measured = await measure_uplink_mbps(rt, bootstrap_peer, int(probe_mb * 1e6)) if bootstrap_peer else None
    if measured is None:
        log.warning("could not measure this peer's uplink; announcing the configured network.up_mbps=%g", configured_mbps)
        return configured_mbps
    log.info("Measured uplink %.1f Mb/s to the bootstrap (configured network.up_mbps=%g); announcing the measured value",
             measured, configured_mbps)
    return measured
