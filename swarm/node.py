"""One live peer's networking: libp2p daemon, DHT node and runtime, started and stopped together."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator, RecordValidatorBase
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError

from swarm.lifecycle import P2PD_PID_FILE, SwarmError, check_port_free, clean_leftovers, ensure_identity, new_identity, node_dir
from swarm.runtime import LiveRuntime, SubkeyValidator

log = logging.getLogger(__name__)

EPHEMERAL_IDENTITY_FILE = "identity.key"
"""A node started without ``identity_path`` gets a new key in its socket folder (removed when it stops)."""


@dataclass(frozen=True)
class NodeSettings:
    """Where a peer listens, whom it contacts first, and its identity."""

    host: str = "127.0.0.1"
    port: int = 0
    announce_host: str | None = None
    announce_port: int | None = None
    initial_peers: tuple[str, ...] = ()
    identity_path: Path | None = None
    """The libp2p key file (created if missing): the peer id is its hash, and it signs this peer's DHT records."""
    nat_traversal: bool = False
    max_message_bytes: int = 256 * 2**20
    startup_timeout_s: float = 30.0
    injected_latency_s: float = 0.0

    def host_maddrs(self) -> list[str]:
        """The multiaddr p2pd listens on."""
        return [f"/ip4/{self.host}/tcp/{self.port}"]

    def announce_maddrs(self) -> list[str] | None:
        """What the peer tells others to dial (a public address and forwarded port), if set."""
        if self.announce_host is None and self.announce_port is None:
            return None
        return [f"/ip4/{self.announce_host or self.host}/tcp/{self.announce_port or self.port}"]


class LiveNode:
    """A started peer: ``runtime`` is what protocol roles receive. Use ``await LiveNode.start(...)``
    and always ``await node.stop()`` (it stops p2pd and removes this process's socket folder)."""

    def __init__(self, p2p: P2P, dht: DHTNode, signer: RSASignatureValidator, runtime: LiveRuntime, folder: Path):
        self.p2p, self.dht, self.signer, self.runtime, self.folder = p2p, dht, signer, runtime, folder
        self.visible_maddrs: list[str] = []
        """Full multiaddrs (ending in /p2p/<peer id>) that other peers pass as ``swarm.initial_peers``."""

    @classmethod
    async def start(cls, settings: NodeSettings) -> "LiveNode":
        """Clean leftovers of killed peers, then start p2pd, the DHT node and the RPC handler. One key, the
        identity file's, is both the peer id (p2pd's) and the signer of this peer's DHT records."""
        clean_leftovers()
        check_port_free(settings.host, settings.port)
        folder = node_dir()
        P2P._UNIX_SOCKET_PREFIX = f"/unix/{folder}/"  # sockets in our folder, not /tmp (see lifecycle)
        p2p = None
        try:
            if settings.identity_path is None:
                settings = dataclasses.replace(settings, identity_path=folder / EPHEMERAL_IDENTITY_FILE)
                key = new_identity(settings.identity_path)
            else:
                key = ensure_identity(settings.identity_path)
            signer = RSASignatureValidator(key)
            p2p = await _start_p2p(settings)
            if p2p._child is not None:
                (folder / P2PD_PID_FILE).write_text(str(p2p._child.pid))
            dht = await _start_dht(p2p, settings, CompositeValidator([signer, SubkeyValidator()]))
        except BaseException:
            if p2p is not None:
                await p2p.shutdown()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        runtime = LiveRuntime(p2p, dht, signer.local_public_key, settings.max_message_bytes, settings.injected_latency_s)
        await runtime.start()
        node = cls(p2p, dht, signer, runtime, folder)
        node.visible_maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
        log.info("Peer %s listening on %s", runtime.peer_id, " ".join(node.visible_maddrs))
        return node

    async def stop(self) -> None:
        """Stop tasks, the DHT node and p2pd; remove the socket folder."""
        try:
            await self.runtime.close()
            await self.dht.shutdown()
        finally:
            await self.p2p.shutdown()
            shutil.rmtree(self.folder, ignore_errors=True)


async def _start_p2p(settings: NodeSettings) -> P2P:
    try:
        return await P2P.create(
            initial_peers=list(settings.initial_peers) or None,
            host_maddrs=settings.host_maddrs(),
            announce_maddrs=settings.announce_maddrs(),
            identity_path=str(settings.identity_path),
            nat_port_map=settings.nat_traversal,
            auto_nat=settings.nat_traversal,
            use_relay=settings.nat_traversal,
            startup_timeout=settings.startup_timeout_s,
        )
    except P2PDaemonError as error:
        text = str(error)
        if "already taken" in text:
            raise SwarmError(
                f"the identity in {settings.identity_path} is already online (another process runs with this key): "
                "stop it, or give this peer its own key file with swarm.identity_path"
            ) from None
        if settings.initial_peers and any(sign in text.lower() for sign in UNREACHABLE_SIGNS):
            raise _unreachable(settings) from None
        raise SwarmError(f"the libp2p daemon did not start: {text}") from None


async def _start_dht(p2p: P2P, settings: NodeSettings, validator: RecordValidatorBase) -> DHTNode:
    try:
        return await DHTNode.create(
            p2p=p2p, initial_peers=list(settings.initial_peers) or None, record_validator=validator,
            bootstrap_timeout=settings.startup_timeout_s,
        )
    except (AssertionError, P2PDaemonError, ConnectionError, OSError) as error:
        if settings.initial_peers:
            raise _unreachable(settings) from error
        raise


UNREACHABLE_SIGNS = ("bootstrap", "dial", "connect", "failed to find any peer")
"""Words of a daemon start failure that, when initial peers are given, mean none of them answered. The last is the
DHT's routing-table refresh, which p2pd may log (and hivemind then reports as its start failure) before it gives up
dialing on a loaded machine (seen in a CI run: "failed to query for self, err=failed to find any peer in table")."""


def _unreachable(settings: NodeSettings) -> SwarmError:
    return SwarmError(
        f"could not reach any of the initial peers {list(settings.initial_peers)}: check the address (it must end in "
        "/p2p/<peer id>, as printed by the bootstrap), that the peer is running, and that its port is open"
    )
