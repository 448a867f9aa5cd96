"""Process hygiene for live peers: private socket folders, leftovers of killed peers, ports, keys.

hivemind's libp2p daemon talks to Python over unix sockets, by default in ``/tmp``, and a peer
killed with SIGKILL leaves its daemon (``p2pd``) running and its socket files behind
(seen here: ``tests/test_swarm_node.py`` kills a peer with SIGKILL and checks the cleanup). Here every peer process gets its own
folder ``<runtime dir>/<pid>.<n>/`` for its sockets and a ``p2pd.pid`` file; the next peer that
starts on the machine removes the folders of dead processes and stops their daemons. A process whose own shutdown
does not finish in time (:func:`exit_hard_after`) stops its daemons and exits.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

log = logging.getLogger(__name__)

P2PD_PID_FILE = "p2pd.pid"
SHA256_MULTIHASH_PREFIX = bytes([0x12, 32])
"""Multihash header of a 32-byte sha2-256 digest (code 0x12), as libp2p peer ids of RSA keys begin."""
MAX_FOLDER_CHARS = 107 - len("/p2pclient-") - 16 - len(".sock")
"""A unix socket path has at most 107 characters (Linux ``sun_path``); hivemind adds ~32 to the folder."""


class SwarmError(RuntimeError):
    """A live peer cannot start or go on; the message says why and what to do."""


def runtime_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where this user's live peers (started with environment ``env``) keep their per-node socket folders."""
    return Path(env.get("NODE0SIM_RUNTIME_DIR") or Path(tempfile.gettempdir()) / f"node0sim-{os.getuid()}")


_node_numbers = itertools.count()


def node_dir() -> Path:
    """A new private folder ``<pid>.<n>`` for one node of this process (created empty); its sockets go there."""
    path = runtime_dir() / f"{os.getpid()}.{next(_node_numbers)}"
    if len(str(path)) > MAX_FOLDER_CHARS:
        raise SwarmError(
            f"the socket folder {path} is too long for unix sockets ({MAX_FOLDER_CHARS} characters at most): "
            "set NODE0SIM_RUNTIME_DIR to a short path such as /tmp/n0"
        )
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_p2pd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"p2pd")
    except OSError:
        return False


def _remove_node_folder(folder: Path, sig: signal.Signals) -> None:
    """Send ``sig`` to the daemon a node folder names (if it still runs), then remove the folder."""
    pid_file = folder / P2PD_PID_FILE
    if pid_file.is_file():
        daemon = int(pid_file.read_text().strip() or 0)
        if daemon and _alive(daemon) and _is_p2pd(daemon):
            os.kill(daemon, sig)
    shutil.rmtree(folder, ignore_errors=True)


def clean_leftovers(base: Path | None = None) -> list[int]:
    """Remove the folders of dead peer processes under ``base`` (default: :func:`runtime_dir`) and stop
    the daemons they left; returns their pids."""
    base = base or runtime_dir()
    cleaned = []
    for folder in sorted(base.glob("[0-9]*.[0-9]*")) if base.is_dir() else ():
        owner = int(folder.name.split(".")[0])
        if _alive(owner):
            continue
        _remove_node_folder(folder, signal.SIGTERM)
        cleaned.append(owner)
    if cleaned:
        log.info("Removed the leftovers of %d peer process(es) that did not shut down cleanly: %s", len(cleaned), cleaned)
    return cleaned


def exit_hard_after(deadline_s: float) -> threading.Timer:
    """Unless cancelled within ``deadline_s``, stop this process's daemons (SIGKILL), remove its node folders and exit with
    status 1: a stuck shutdown step must not hold the process (see ``swarm.roles.SHUTDOWN_DEADLINE_S``)."""
    def exit_hard() -> None:
        for folder in runtime_dir().glob(f"{os.getpid()}.*"):
            _remove_node_folder(folder, signal.SIGKILL)
        log.error("the shutdown did not finish within %g s: stopped this process's p2pd and exited", deadline_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(deadline_s, exit_hard)
    timer.daemon = True
    timer.start()
    return timer


def check_port_free(host: str, port: int) -> None:
    """Fail with a clear message if ``host:port`` cannot be listened on (0 = any free port)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise SwarmError(
                    f"port {port} on {host} is taken (another node0sim peer or program listens there): stop it, "
                    f"or choose another one with swarm.host_port=<port> (and swarm.announce_port if you forward ports)"
                ) from None
            raise SwarmError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def load_identity(path: Path) -> RSAPrivateKey:
    """The RSA key of a libp2p identity file (``private.key``), used to sign DHT records."""
    try:
        protobuf = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    except Exception as error:
        raise SwarmError(f"{path} is not a libp2p private key file ({error}); move it away to create a new one") from None
    if protobuf.key_type != crypto_pb2.KeyType.RSA:
        raise SwarmError(f"{path} holds a non-RSA key; node0sim signs run records with RSA keys")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": protobuf.data})  # hivemind's own (un)pickling path for RSA keys
    return key


def new_identity(path: Path) -> RSAPrivateKey:
    """Create a new RSA identity key file at ``path`` (owner-only permissions; it must not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = RSAPrivateKey()
    protobuf = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(protobuf.SerializeToString())
    return key


def ensure_identity(path: Path) -> RSAPrivateKey:
    """Load ``path`` or create it (owner-only permissions): the peer's persistent identity."""
    if not path.exists():
        new_identity(path)
        log.info("Created a new identity key at %s (keep it to rejoin as the same peer)", path)
    elif path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others; its permissions are now owner-only", path)
    return load_identity(path)


def fingerprint(key_bytes: bytes) -> str:
    """Short printable id of a public key (what peers are told to trust)."""
    return hashlib.sha256(key_bytes).hexdigest()[:16]


def rsa_peer_id(public_key: bytes) -> str:
    """The libp2p peer id of an RSA public key in hivemind's serialized (OpenSSH) form: the sha2-256 multihash
    of the key's protobuf, DER-encoded (libp2p specs, peer-ids.md), in base58. Raises ``ValueError`` for bytes
    that are no RSA public key."""
    key = serialization.load_ssh_public_key(public_key)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"not an RSA public key: {type(key).__name__}")
    der = key.public_bytes(encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo)
    protobuf = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    return PeerID(SHA256_MULTIHASH_PREFIX + hashlib.sha256(protobuf).digest()).to_base58()
