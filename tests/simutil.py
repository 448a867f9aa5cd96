"""Helpers for building small simulations in tests."""

from __future__ import annotations

from node0sim.sim.engine import SimPeer, Simulation
from node0sim.sim.gpus import gpu_profile


def make_sim(
    latency_s: float = 0.0, *, seed: int = 0, jitter_s: float = 0.0, dht_latency_s: float = 0.0, pair_streams: str = "shared",
) -> Simulation:
    """A simulation with the same one-way latency between every pair of peers."""
    return Simulation(seed=seed, latency_s=lambda a, b: latency_s, jitter_s=jitter_s, dht_latency_s=dht_latency_s,
                      pair_streams=pair_streams)


def add(sim: Simulation, name: str, up_mbps: float = 100.0, down_mbps: float = 100.0) -> SimPeer:
    """A peer with an RTX 3090 at 40% utilization."""
    return sim.add_peer(name, region="r", up_mbps=up_mbps, down_mbps=down_mbps, gpu=gpu_profile("rtx3090"), utilization=0.4)
