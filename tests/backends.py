"""Run one protocol scenario on either backend: ``run_scenario(backend, names, scenario)``.

A scenario is ``async def scenario(runtimes: dict[name, Runtime]) -> result``: it spawns protocol
roles on the runtimes it is given and returns what the test checks. On ``sim`` every name is a
simulated peer (20 ms latency, 50 Mb/s); on ``swarm`` every name is a live hivemind node in this
process on 127.0.0.1 (its own libp2p daemon and DHT node), all stopped afterwards.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from node0sim.runtime import Runtime
from tests.simutil import add, make_sim

Scenario = Callable[[dict[str, Runtime]], Awaitable[Any]]
BACKENDS = ("sim", "swarm")


def run_scenario(backend: str, names: list[str], scenario: Scenario, timeout_s: float = 120.0) -> Any:
    """The scenario's result on ``backend``."""
    if backend == "sim":
        sim = make_sim(latency_s=0.02, dht_latency_s=0.01)
        runtimes = {name: add(sim, name, 50, 50).runtime for name in names}
        task = runtimes[names[0]].spawn(scenario(runtimes))
        sim.run(until=task.process)
        return task.process.value
    return asyncio.run(asyncio.wait_for(_on_live_nodes(names, scenario), timeout_s))


async def _on_live_nodes(names: list[str], scenario: Scenario) -> Any:
    from swarm.node import LiveNode, NodeSettings

    nodes = [await LiveNode.start(NodeSettings())]
    try:
        for _ in names[1:]:
            nodes.append(await LiveNode.start(NodeSettings(initial_peers=tuple(nodes[0].visible_maddrs))))
        result = await scenario({name: node.runtime for name, node in zip(names, nodes)})
        errors = [error for node in nodes for error in node.runtime.errors]
        assert not errors, f"protocol tasks failed: {errors}"
        return result
    finally:
        for node in nodes:
            await node.stop()
