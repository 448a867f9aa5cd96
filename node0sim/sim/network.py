"""Emulated network: per-peer access links shared max-min fairly, plus region latency.

Model (a fluid flow model, as used by flow-level network simulators such as SimGrid):
- every peer has an uplink and a downlink of fixed capacity; the core of the internet is
  assumed uncongested, so a flow from A to B is limited only by A's uplink and B's downlink;
- concurrent flows share links max-min fairly (progressive filling): whenever a flow starts,
  finishes or is aborted, the rates of the flows connected to it through shared links are
  recomputed and their completion times rescheduled (``sharing="maxmin"``, the default);
- or, for very large swarms, each link is split equally among its flows and a flow gets the
  smaller of its two shares (``sharing="equal"``): only the flows on the two links a change
  touches are updated, at the price of leaving capacity unused when a flow is limited elsewhere;
- or each link is an independent processor-sharing queue (``sharing="per_link"``): it serves its
  flows equally and fully, and a message is complete once both its uplink and its downlink have
  carried all its bytes (as if the core buffered between them). A link keeps a virtual clock, the
  bytes each of its flows has received so far, so a flow's finish on it is known when the flow
  starts (start clock + size) and only the link's next completion is scheduled: O(log n) per
  change instead of rescheduling every flow on the link. It never leaves capacity unused, so it
  is slightly optimistic where ``equal`` is pessimistic;
- a message is delivered one one-way latency (plus optional jitter) after its last byte left,
  so an isolated transfer of S bytes over B bit/s with latency L takes exactly L + 8S/B.

Transport (``transport=TcpModel(...)``, ``sim.transport=tcp``; None is the plain fluid model above):
- framing: a message of S payload bytes puts ``message_overhead_bytes + byte_overhead * S`` bytes
  on the links (libp2p stream negotiation and yamux/noise frames, TCP/IP/Ethernet headers per segment);
- window: one stream carries at most ``window_bytes`` per round trip, so a flow's rate is capped at
  window / RTT (RTT = twice the pair's one-way latency; no cap at zero latency). Progressive filling
  treats each flow's cap as a private link (Mathis et al. 1997 write the same bound as W / RTT);
- slow start (RFC 5681 section 3.1, initial window of RFC 6928): the first message of a connection
  (a peer pair), or the first after it was idle longer than an RTO when ``slow_start_after_idle``
  (Linux ``net.ipv4.tcp_slow_start_after_idle=1``), starts from the initial window and doubles it per
  RTT until one round carries the bottleneck's bytes per RTT. It is charged as extra delivery delay,
  computed once from the flow's uncontended bottleneck rate at its start (:func:`slow_start_delay`);
  messages of a connection that is busy (another flow on it) go at the connection's open window;
- software: the live stack (encode, copies through the libp2p daemons, decode) moves a message's payload at
  most at ``software_bytes_per_s``, pipelined with the link: a flow's rate is also capped there. Measured
  (``tools/bench_wire.py``): a call of S bytes takes ``fixed + S / 129 MB/s`` on an unshaped link, and
  ``fixed + wire bytes / rate`` to within 1% on a 10 Mb/s one (not the sum of both).
Not modelled: loss, queueing delay in the shapers' buffers, window growth by yamux auto-tuning.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable

import simpy

from node0sim.sim.timers import TimerHeap, succeed_at

SHARING_MODELS = ("maxmin", "equal", "per_link")
TRANSPORTS = ("fluid", "tcp")

MSS_BYTES = 1448
"""TCP payload per segment on a 1500-byte MTU with timestamps (1500 - 20 IP - 20 TCP - 12 options), Linux's default."""

INITIAL_WINDOW_BYTES = 10 * MSS_BYTES
"""TCP's initial congestion window: 10 segments (RFC 6928)."""

RTO_MIN_S = 0.2
"""Linux's minimum retransmission timeout (``TCP_RTO_MIN``, 200 ms); its RTO is about srtt + max(4 rttvar, RTO_MIN)."""


@dataclass(frozen=True)
class TcpModel:
    """Transport effects on top of fluid sharing (see the module docstring); constants from ``sim.tcp_*``."""

    window_bytes: float
    message_overhead_bytes: float
    byte_overhead: float
    slow_start_after_idle: bool = True
    path_rtt_s: float | None = None
    """The round trip the transport sees, where it is not the messages' latency (None: twice the one-way latency)."""
    software_bytes_per_s: float = math.inf
    """Most payload bytes/s the live stack encodes, copies through its daemons and decodes (pipelined with the link)."""

    def wire_bytes(self, payload_bytes: float) -> float:
        """Bytes a message of ``payload_bytes`` puts on the links."""
        return self.message_overhead_bytes + self.byte_overhead * payload_bytes

    def rate_cap(self, rtt_s: float) -> float:
        """Most bytes/s one stream carries at this round-trip time (window / RTT; unbounded at 0)."""
        return self.window_bytes / rtt_s if rtt_s > 0 else math.inf


def slow_start_delay(nbytes: float, rate: float, rtt_s: float, initial_window: float = INITIAL_WINDOW_BYTES) -> float:
    """Extra time slow start adds to sending ``nbytes`` at bottleneck ``rate`` (bytes/s) over ``rtt_s``.

    The window starts at ``initial_window`` and doubles each RTT; round ``j`` (window ``w 2^j`` below the
    bytes per RTT ``rate x rtt``) waits a whole RTT for its ACKs. After ``k`` such rounds the rest goes at
    ``rate``, so the time is ``k rtt + (nbytes - w (2^k - 1)) / rate`` against the fluid ``nbytes / rate``:
    the delay is ``k rtt - w (2^k - 1) / rate``, with ``k`` the rounds before the window reaches
    ``rate x rtt`` (``ceil(log2(rate rtt / w))``) or before the message is out, whichever is fewer.
    """
    if rtt_s <= 0 or nbytes <= 0 or rate * rtt_s <= initial_window:
        return 0.0
    to_full_rate = math.ceil(math.log2(rate * rtt_s / initial_window))
    rounds_for_message = math.ceil(math.log2(nbytes / initial_window + 1)) - 1
    k = min(to_full_rate, rounds_for_message)
    return max(0.0, k * rtt_s - initial_window * (2**k - 1) / rate)


class Link:
    """One direction of a peer's access link, with the flows currently using it."""

    __slots__ = ("capacity", "flows", "name", "served", "served_at", "finishes", "version", "left", "unfrozen")

    def __init__(self, name: str, capacity_bytes_per_s: float):
        if not capacity_bytes_per_s > 0:
            raise ValueError(f"link {name}: bandwidth must be > 0, got {capacity_bytes_per_s * 8 / 1e6} Mb/s")
        self.name = name
        self.capacity = capacity_bytes_per_s
        self.flows: dict[Flow, None] = {}
        # per_link sharing: bytes served to each flow since the start (virtual clock), when it was last
        # advanced, the flows' finish tags on this link (lazy heap), and the version of its completion entry
        self.served = 0.0
        self.served_at = 0.0
        self.finishes: list[tuple[float, int, Flow]] = []
        self.version = 0
        # maxmin sharing: capacity not yet given out and flows not yet frozen, during one progressive filling
        self.left = 0.0
        self.unfrozen = 0

    def advance(self, now: float) -> None:
        """Move the virtual clock to ``now``: each flow received an equal share since the last change."""
        if self.flows:
            self.served += (now - self.served_at) * self.capacity / len(self.flows)
        self.served_at = now


class Flow:
    """Bytes moving from one uplink to one downlink."""

    __slots__ = ("up", "down", "remaining", "rate", "updated_at", "version", "latency", "done", "active", "links_left",
                 "cap", "connection")

    def __init__(
        self, up: Link, down: Link, nbytes: float, latency: float, done: simpy.Event, now: float,
        cap: float = math.inf, connection: tuple[str, str] | None = None,
    ):
        self.up, self.down = up, down
        self.remaining = float(nbytes)
        self.rate = 0.0
        self.updated_at = now
        self.version = 0
        self.latency = latency
        self.done = done
        self.active = True
        self.links_left = 2
        self.cap = cap
        """Most bytes/s this flow may get (the transport's window / RTT; inf: none)."""
        self.connection = connection
        """(source, destination) peer ids of the connection it travels on (transport model), or None."""


class Endpoint:
    """A peer's attachment to the network: its region and its two links."""

    __slots__ = ("peer_id", "region", "up", "down")

    def __init__(self, peer_id: str, region: str, up_mbps: float, down_mbps: float):
        self.peer_id = peer_id
        self.region = region
        self.up = Link(f"{peer_id}/up", up_mbps * 1e6 / 8)
        self.down = Link(f"{peer_id}/down", down_mbps * 1e6 / 8)


class Network:
    """All links of a simulation; ``transfer`` returns an event that fires on delivery."""

    def __init__(
        self,
        env: simpy.Environment,
        latency_s: Callable[[str, str], float],
        jitter_s: float,
        rng: random.Random,
        sharing: str = "maxmin",
        transport: TcpModel | None = None,
    ):
        if sharing not in SHARING_MODELS:
            raise ValueError(f"sim.link_sharing: {sharing!r} is not one of {list(SHARING_MODELS)}")
        if transport is not None and sharing == "per_link":
            raise ValueError("sim.transport=tcp needs sim.link_sharing=maxmin or equal (per_link has no per-flow rate caps)")
        self.env = env
        self.sharing = sharing
        self.transport = transport
        self._connections: dict[tuple[str, str], tuple[int, float]] = {}
        """Transport model: per (source, destination) peer pair, flows in progress and when the last one ended."""
        self._latency_s = latency_s
        self._jitter_s = jitter_s
        self._rng = rng
        self.bytes_sent = 0
        # pending completions: flows (maxmin, equal) or links (per_link), tagged with their version
        self._finishes: TimerHeap[Flow | Link] = TimerHeap(env, _is_current, self._complete, slack=1e-12, exact=False)
        self._order = itertools.count()  # tie-breaker of the links' finish tags

    def round_trip(self, src: Endpoint, dst: Endpoint) -> float:
        """Round-trip time between two peers without jitter (twice the base one-way latency)."""
        return 2 * self._latency_s(src.region, dst.region)

    def latency(self, src: Endpoint, dst: Endpoint) -> float:
        """One-way latency of the next message from ``src`` to ``dst`` (jitter drawn from the run's RNG)."""
        base = self._latency_s(src.region, dst.region)
        return base + self._rng.uniform(0.0, self._jitter_s) if self._jitter_s > 0 else base

    def transfer(self, src: Endpoint, dst: Endpoint, nbytes: int) -> Flow:
        """Start sending ``nbytes`` from ``src`` to ``dst``; ``flow.done`` fires when they arrive."""
        done = self.env.event()
        self.bytes_sent += nbytes
        if src is dst:
            done.succeed()
            return Flow(src.up, dst.down, 0, 0.0, done, self.env.now)
        if self.transport is not None:
            flow = self._transport_flow(src, dst, nbytes, done)
        else:
            flow = Flow(src.up, dst.down, nbytes, self.latency(src, dst), done, self.env.now)
        if flow.remaining <= 0:
            self._deliver_after_latency(flow)
            return flow
        if self.sharing == "per_link":
            now = self.env.now
            order = self._order
            remaining = flow.remaining
            for link in (flow.up, flow.down):
                flows = link.flows
                if flows:  # Link.advance, inlined (hot path)
                    link.served += (now - link.served_at) * link.capacity / len(flows)
                link.served_at = now
                flows[flow] = None
                heapq.heappush(link.finishes, (link.served + remaining, next(order), flow))
                self._schedule_link(link)
            self._finishes.arm()
            return flow
        flow.up.flows[flow] = None
        flow.down.flows[flow] = None
        self._reshare((flow.up, flow.down))
        return flow

    def _transport_flow(self, src: Endpoint, dst: Endpoint, nbytes: int, done: simpy.Event) -> Flow:
        """A flow with the transport model's framing, window cap and (on a cold connection) slow-start delay."""
        tcp, now = self.transport, self.env.now
        rtt = self.round_trip(src, dst) if tcp.path_rtt_s is None else tcp.path_rtt_s
        wire = tcp.wire_bytes(nbytes)
        cap = min(tcp.rate_cap(rtt), tcp.software_bytes_per_s * wire / max(nbytes, 1))  # the software's rate, in wire bytes
        key = (src.peer_id, dst.peer_id)
        active, last_end = self._connections.get(key, (0, -math.inf))
        cold = active == 0 and (last_end == -math.inf or tcp.slow_start_after_idle and now - last_end > rtt / 2 + RTO_MIN_S)
        latency = self.latency(src, dst)
        if cold:
            latency += slow_start_delay(wire, min(src.up.capacity, dst.down.capacity, cap), rtt)
        self._connections[key] = (active + 1, last_end)
        return Flow(src.up, dst.down, wire, latency, done, now, cap, key)

    def _connection_idle(self, flow: Flow, ended_at: float) -> None:
        """Transport model: ``flow`` is delivered at ``ended_at`` (or aborted now); its connection may go idle.

        Linux restarts slow start when nothing was sent for an RTO (about srtt + RTO_MIN) since the last send,
        one latency before delivery: so the connection is cold once RTT / 2 + RTO_MIN passed after ``ended_at``.
        """
        if flow.connection is not None:
            active, _ = self._connections[flow.connection]
            self._connections[flow.connection] = (active - 1, ended_at)
            flow.connection = None

    def abort(self, flow: Flow) -> None:
        """Stop a flow whose sender gave up; its bandwidth goes back to the others."""
        if not flow.active:
            return
        flow.active = False
        self._connection_idle(flow, self.env.now)
        if self.sharing == "per_link":
            for link in (flow.up, flow.down):
                if flow in link.flows:
                    link.advance(self.env.now)
                    del link.flows[flow]
                    self._schedule_link(link)
            self._finishes.arm()
        elif flow in flow.up.flows:
            self._remove(flow)

    def _remove(self, flow: Flow) -> None:
        del flow.up.flows[flow]
        del flow.down.flows[flow]
        self._reshare((flow.up, flow.down))

    def _component(self, seeds: tuple[Link, ...]) -> tuple[dict[Link, None], dict[Flow, None]]:
        """Links and flows connected to ``seeds`` through shared links (ordered, for determinism)."""
        links: dict[Link, None] = {}
        flows: dict[Flow, None] = {}
        stack = list(seeds)
        while stack:
            link = stack.pop()
            if link in links:
                continue
            links[link] = None
            for flow in link.flows:
                if flow not in flows:
                    flows[flow] = None
                    other = flow.down if flow.up is link else flow.up
                    if other not in links:
                        stack.append(other)
        return links, flows

    def _reshare(self, seeds: tuple[Link, ...]) -> None:
        """Recompute max-min fair rates around ``seeds`` and reschedule completions."""
        now = self.env.now
        if self.sharing == "maxmin":
            links, flows = self._component(seeds)
        else:
            flows = {flow: None for link in seeds for flow in link.flows}
        for flow in flows:
            remaining = flow.remaining - flow.rate * (now - flow.updated_at)
            flow.remaining = remaining if remaining > 0.0 else 0.0
            flow.updated_at = now
        if self.sharing == "maxmin":
            new_rates = self._max_min_rates(links, flows)
        else:
            new_rates = {f: min(f.up.capacity / len(f.up.flows), f.down.capacity / len(f.down.flows), f.cap) for f in flows}
        push = self._finishes.push
        for flow, rate in new_rates.items():
            if rate != flow.rate or flow.version == 0:
                flow.rate = rate
                flow.version += 1
                push(now + flow.remaining / rate, flow, flow.version)
        self._finishes.arm()

    def _schedule_link(self, link: Link) -> None:
        """per_link: one completion entry for the link's earliest-finishing flow (older entries go stale)."""
        finishes, flows = link.finishes, link.flows
        while finishes and finishes[0][2] not in flows:
            heapq.heappop(finishes)
        version = link.version = link.version + 1
        if finishes:
            finish = link.served_at + (finishes[0][0] - link.served) * len(flows) / link.capacity
            self._finishes.push(finish, link, version)

    def _finish_on_link(self, link: Link) -> None:
        """per_link: flows whose last byte just crossed ``link``; a flow done on both links is delivered."""
        now = self.env.now
        flows, finishes = link.flows, link.finishes
        if flows:  # Link.advance, inlined (hot path)
            link.served += (now - link.served_at) * link.capacity / len(flows)
        link.served_at = now
        # absorb rounding: whatever the link serves in the timer's time tolerance counts as done
        due = link.served + 1e-12 * max(1.0, now) * link.capacity / max(1, len(flows))
        while finishes and finishes[0][0] <= due:
            flow = heapq.heappop(finishes)[2]
            if flow in flows:
                del flows[flow]
                flow.links_left -= 1
                if flow.links_left == 0:
                    flow.remaining = 0.0
                    self._deliver_after_latency(flow)
        self._schedule_link(link)

    @staticmethod
    def _max_min_rates(links: dict[Link, None], flows: dict[Flow, None]) -> dict[Flow, float]:
        """Progressive filling: repeatedly saturate the link offering the smallest fair share.

        A flow's own cap (window / RTT) acts as a private link: once the fair share reaches it, the flow is
        frozen at its cap and the links it crosses share what is left among their other flows.

        Each level freezes, in the order of ``links``, every link whose fair share (capacity left / unfrozen
        flows, kept on the link in ``left`` and ``unfrozen``) is within a relative 1e-12 of the smallest. The
        smallest comes from a heap of ``(share, position, link)`` entries, one pushed for each link whose share a
        level (or a capped flow) changed (older ones are skipped), so a level costs the links it touches, not
        every link of the component. (This is the hot loop of a large swarm's simulation, hence inlined.)
        """
        if len(flows) == 1:
            (flow,) = flows
            return {flow: min(flow.up.capacity, flow.down.capacity, flow.cap)}
        heappop, heappush = heapq.heappop, heapq.heappush
        position: dict[Link, int] = {}
        heap: list[tuple[float, int, Link]] = []
        for link in links:
            if link.flows:
                link.left = link.capacity
                link.unfrozen = len(link.flows)
                position[link] = len(position)
                heap.append((link.left / link.unfrozen, position[link], link))
        heapq.heapify(heap)
        rates: dict[Flow, float] = {}
        capped = sorted((f for f in flows if f.cap < math.inf), key=lambda f: f.cap)
        next_capped = 0
        while len(rates) < len(flows):
            while True:  # drop entries whose link's share changed since they were pushed
                share, _, link = heap[0]
                if link.unfrozen > 0 and link.left / link.unfrozen == share:
                    break
                heappop(heap)
            while next_capped < len(capped) and capped[next_capped] in rates:
                next_capped += 1
            if next_capped < len(capped) and capped[next_capped].cap <= share:
                flow = capped[next_capped]
                next_capped += 1
                rates[flow] = flow.cap
                for shared in (flow.up, flow.down):
                    shared.left -= flow.cap
                    shared.unfrozen -= 1
                    if shared.unfrozen:
                        heappush(heap, (shared.left / shared.unfrozen, position[shared], shared))
                continue
            bound = share * (1 + 1e-12)
            level: dict[Link, None] = {}
            while heap and heap[0][0] <= bound:
                entry_share, _, link = heappop(heap)
                if link.unfrozen > 0 and link.left / link.unfrozen == entry_share:
                    level[link] = None
            touched: dict[Link, None] = {}
            for link in sorted(level, key=position.__getitem__):
                if link.unfrozen and link.left / link.unfrozen <= bound:
                    for flow in link.flows:
                        if flow not in rates:
                            rates[flow] = share
                            for shared in (flow.up, flow.down):
                                shared.left -= share
                                shared.unfrozen -= 1
                                touched[shared] = None
            for shared in touched:
                if shared.unfrozen:
                    heappush(heap, (shared.left / shared.unfrozen, position[shared], shared))
        return rates

    def _complete(self, item: Flow | Link) -> None:
        """A due completion: a flow's last byte left (maxmin, equal), or a link's earliest flow is served (per_link)."""
        if item.__class__ is Link:
            self._finish_on_link(item)
            return
        item.remaining = 0.0
        self._remove(item)
        self._deliver_after_latency(item)

    def _deliver_after_latency(self, flow: Flow) -> None:
        """Trigger ``flow.done`` now, to be processed one latency later (one SimPy event, as a Timeout).

        The flow counts as delivered from here on: an abort while the last byte is in flight is a no-op,
        and a sender that stopped waiting (crashed, cancelled) simply no longer listens to ``flow.done``.
        """
        flow.active = False
        self._connection_idle(flow, self.env.now + flow.latency)
        succeed_at(self.env, flow.done, self.env.now + flow.latency)


def _is_current(item: Flow | Link, version: int) -> bool:
    """Whether a completion entry still stands: its flow or link was not rescheduled since, nor the flow removed."""
    return item.version == version and (item.__class__ is Link or (item.active and item in item.up.flows))
