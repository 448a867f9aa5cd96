"""A server checks at join that other peers can reach it: the bootstrap dials it back.

A server behind a NAT or a firewall can call out (to the bootstrap, the DHT) but nobody can call in, so it
would join a stage, be routed requests and answer none. Node0 and Petals probe the announced port at join;
here the server asks the bootstrap (``dial_back``) to open a TCP connection to the port it announces, at the
IP address its own connection to the bootstrap comes from (the bootstrap's daemon reports it), so the check
cannot be pointed at another host. A failed dial is a :class:`SwarmError` naming the address and what to
change; with ``swarm.nat_traversal`` (relays) it is a warning.
"""

from __future__ import annotations

import asyncio
import logging

from node0sim.protocol.messages import check_message, message
from node0sim.runtime import RPCError
from swarm.lifecycle import SwarmError
from swarm.runtime import LiveRuntime

log = logging.getLogger("node0sim.swarm")

DIAL_BACK = "dial_back"
DIAL_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 30.0


@message
class DialBack:
    """Ask the callee to open a TCP connection to ``port`` at the caller's own IP address."""

    port: int


@message
class DialBackResult:
    """``address``: what was dialed (``ip:port``); ``error``: why the connection failed ("" if it opened)."""

    address: str
    error: str


def component(maddr: str, protocol: str) -> str | None:
    """The value of ``protocol`` (``ip4``, ``tcp``) in a direct multiaddr; None if absent or relayed."""
    parts = str(maddr).split("/")
    if "p2p-circuit" in parts or protocol not in parts[:-1]:
        return None
    return parts[parts.index(protocol) + 1]


def tcp_port(maddrs: list[str]) -> int:
    """The TCP port of the first direct ``/tcp/`` multiaddr in ``maddrs`` (what this peer announces)."""
    for maddr in maddrs:
        port = component(maddr, "tcp")
        if port is not None:
            return int(port)
    raise SwarmError(f"this peer announces no TCP address ({maddrs}): set swarm.announce_host and swarm.announce_port")


async def caller_ip(rt: LiveRuntime, caller: str) -> str | None:
    """The IPv4 address of the connection ``caller`` holds to this peer; None for a relayed or unknown one."""
    for info in await rt.p2p.list_peers():
        if info.peer_id.to_base58() != caller:
            continue
        for addr in info.addrs:
            ip = component(addr, "ip4")
            if ip is not None:
                return ip
    return None


def serve_dial_back(rt: LiveRuntime) -> None:
    """Answer reachability checks (the bootstrap does): one TCP connect to the caller's IP and the port it names."""

    async def dial_back(caller: str, request: DialBack) -> DialBackResult:
        check_message(request, DialBack)
        if not 0 < request.port <= 65535:
            raise ValueError(f"DialBack.port: must be a TCP port (1-65535), got {request.port}")
        ip = await caller_ip(rt, caller)
        if ip is None:
            raise ValueError("no direct IPv4 connection from the caller to dial back (relayed?)")
        address = f"{ip}:{request.port}"
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(ip, request.port), DIAL_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as error:
            return DialBackResult(address, str(error) or f"no answer within {DIAL_TIMEOUT_S:g} s")
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), DIAL_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            pass  # the dial itself succeeded: how the probe's socket closes does not change the answer
        return DialBackResult(address, "")

    rt.serve(DIAL_BACK, dial_back)


async def check_reachable(rt: LiveRuntime, bootstrap_peer: str, maddrs: list[str], relays: bool) -> None:
    """Ask the bootstrap to dial this peer back at its announced port; a failure raises :class:`SwarmError`
    (a warning when ``relays``: relayed peers reach it anyway). A bootstrap that cannot run the check is logged."""
    port = tcp_port(maddrs)
    try:
        result = await rt.call(bootstrap_peer, DIAL_BACK, DialBack(port), CALL_TIMEOUT_S)
        check_message(result, DialBackResult)
    except (RPCError, ValueError) as error:  # an unreachable or older bootstrap, or a reply that is no result
        log.warning("the bootstrap did not run the reachability check (%s); going on unchecked", error)
        return
    if not result.error:
        log.info("Reachable: the bootstrap opened a connection to %s", result.address)
        return
    problem = (
        f"other peers cannot reach this peer: the bootstrap could not connect to {result.address} ({result.error}). "
        f"Open or forward TCP port {port} to this machine, or announce the address that reaches it "
        "(swarm.announce_host, swarm.announce_port)"
    )
    if relays:
        log.warning("%s; going on through relays (swarm.nat_traversal=true)", problem)
        return
    raise SwarmError(problem + ", or set swarm.nat_traversal=true to use relays")
