"""Admission (``swarm.admission=token``): only peers holding a token signed by the organizer take part in a run.

A token names one run, one peer id and an expiry, and is signed by the organizer's key (the key whose fingerprint
is ``swarm.organizer_key``; it carries that public key, so any peer can check it). The organizer issues tokens out
of band: ``python -m swarm.admission peer-id KEY`` prints a volunteer's peer id (creating its identity file), and
``python -m swarm.admission issue ...`` signs a token for it. This is the shape of Node0's admission, where an
authorization server exchanges a Hugging Face token for expiring signed access tokens (``n0/security/``, see
``shared/reference/node0-code-facts.md``); hivemind's ``TokenAuthorizerBase`` checks such tokens per RPC.

Where the live backend checks them (``swarm.runtime.LiveRuntime``):
- every RPC carries the caller's token; a server refuses a call whose token is missing, forged, expired, for another
  run or for another peer id than the authenticated caller (libp2p's secure channel authenticates the peer id);
- every entry a peer writes to a dictionary record (stage records, averaging registrations) carries its token, and
  readers drop entries whose token does not check out for the entry's owner, so a peer without a token is never
  routed to, grouped with, or counted in a stage (hivemind's all-reduce streams accept only group members, and
  groups form from these registrations);
- a joiner checks its own token before it joins and stops with a message naming what is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.lifecycle import SHA256_MULTIHASH_PREFIX, SwarmError, ensure_identity, fingerprint, load_identity, rsa_peer_id

if TYPE_CHECKING:
    from swarm.runtime import LiveRuntime

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 4096
"""Tokens are about 880 bytes with hivemind's 2048-bit RSA keys (``tools/bench_swarm.py admission``); larger ones are
refused unparsed."""

_DOMAIN = b"node0sim-admission-v1"


class AdmissionError(ValueError):
    """A token that does not admit its bearer, with the reason."""


@dataclass(frozen=True)
class Token:
    """What the organizer signs: ``peer_id`` may take part in ``run_id`` until ``expires_at`` (DHT time, Unix s)."""

    run_id: str
    peer_id: str
    expires_at: float
    organizer_public_key: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers."""
        return b"\0".join((_DOMAIN, self.run_id.encode(), self.peer_id.encode(), repr(float(self.expires_at)).encode()))

    def to_bytes(self) -> bytes:
        """The token as a JSON document (what a token file holds and what travels with each message)."""
        return json.dumps({
            "run_id": self.run_id, "peer_id": self.peer_id, "expires_at": self.expires_at,
            "organizer_public_key": self.organizer_public_key.decode(), "signature": self.signature.decode(),
        }, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Token":
        """Parse a token; :class:`AdmissionError` if it is no token."""
        if len(data) > MAX_TOKEN_BYTES:
            raise AdmissionError(f"the admission token is {len(data)} bytes, over the {MAX_TOKEN_BYTES}-byte limit")
        try:
            fields = json.loads(data)
            token = cls(str(fields["run_id"]), str(fields["peer_id"]), float(fields["expires_at"]),
                        str(fields["organizer_public_key"]).encode(), str(fields["signature"]).encode())
        except Exception as error:  # bytes from the network or a file: anything can be wrong
            raise AdmissionError(f"not an admission token ({type(error).__name__}: {error})") from None
        return token


def issue(organizer: RSAPrivateKey, run_id: str, peer_id: str, expires_at: float) -> Token:
    """A token admitting ``peer_id`` to ``run_id`` until ``expires_at``, signed with the organizer's key."""
    unsigned = Token(run_id, peer_id, float(expires_at), organizer.get_public_key().to_bytes(), b"")
    return Token(unsigned.run_id, unsigned.peer_id, unsigned.expires_at, unsigned.organizer_public_key,
                 organizer.sign(unsigned.signed_bytes()))


@dataclass(frozen=True)
class Admission:
    """Checks tokens for one run against the organizer's key fingerprint (``swarm.organizer_key``)."""

    run_id: str
    organizer_key: str

    def check(self, token: bytes, peer_id: str, now: float) -> Token:
        """The token if it admits ``peer_id`` at time ``now``; otherwise :class:`AdmissionError` naming why."""
        if not token:
            raise AdmissionError(f"peer {peer_id} presented no admission token (run {self.run_id!r} requires one)")
        parsed = _verified(token)
        if fingerprint(parsed.organizer_public_key) != self.organizer_key:
            raise AdmissionError(f"the admission token of {peer_id} is signed by {fingerprint(parsed.organizer_public_key)}, "
                                 f"not by the organizer {self.organizer_key}")
        if parsed.run_id != self.run_id:
            raise AdmissionError(f"the admission token of {peer_id} is for run {parsed.run_id!r}, not {self.run_id!r}")
        if parsed.peer_id != peer_id:
            raise AdmissionError(f"peer {peer_id} presented the admission token of {parsed.peer_id}")
        if parsed.expires_at <= now:
            raise AdmissionError(f"the admission token of {peer_id} expired {now - parsed.expires_at:.0f} s ago")
        return parsed


@functools.lru_cache(maxsize=4096)
def _verified(token: bytes) -> Token:
    """Parse and verify a token's signature by the key it carries. Cached: every message of a peer carries the same
    token, and a check costs 51 us uncached, 1 us cached (``tools/bench_swarm.py admission``, 2-core machine)."""
    parsed = Token.from_bytes(token)
    try:
        key = RSAPublicKey.from_bytes(parsed.organizer_public_key)
    except Exception as error:  # any bytes can arrive
        raise AdmissionError(f"the admission token's organizer key is not an RSA public key ({error})") from None
    if not key.verify(parsed.signed_bytes(), parsed.signature):
        raise AdmissionError(f"the admission token of {parsed.peer_id} has an invalid signature (forged or altered)")
    return parsed


def load_own_token(path: str | None, admission: Admission, peer_id: str, now: float) -> bytes:
    """This peer's token file, checked before it joins: a :class:`SwarmError` that says what to do if it is unusable."""
    how = ("ask the organizer for one: it runs `python -m swarm.admission issue --organizer-identity <its key> "
           f"--run-id {admission.run_id} --peer-id {peer_id} --hours 24 --out <file>`, and you pass swarm.admission_token=<file>")
    if path is None:
        raise SwarmError(f"run {admission.run_id!r} admits only peers with a token signed by its organizer "
                         f"(swarm.admission=token) and this peer has none: {how}")
    try:
        token = Path(path).read_bytes()
    except OSError as error:
        raise SwarmError(f"swarm.admission_token={path}: cannot read it ({error.strerror})") from None
    try:
        admission.check(token, peer_id, now)
    except AdmissionError as error:
        raise SwarmError(f"swarm.admission_token={path} does not admit this peer: {error}; {how}") from None
    return token


async def keep_own_token(runtime: LiveRuntime, admission: Admission, path: str | None, period_s: float) -> None:
    """A joiner, once admitted with its token file: re-read the file every ``period_s``, so that a renewed token put in
    its place takes effect without a restart (a file that no longer admits the peer is not taken, with a warning)."""
    while True:
        await asyncio.sleep(period_s)
        try:
            runtime.admit(admission, load_own_token(path, admission, runtime.peer_id, runtime.now()))
        except SwarmError as error:
            log.warning("kept the previous admission token: %s", error)


def admit_organizer(runtime: LiveRuntime, admission: Admission, organizer: RSAPrivateKey, period_s: float) -> None:
    """The organizer admits itself with a token it signs, valid for two periods of ``period_s``."""
    token = issue(organizer, admission.run_id, runtime.peer_id, runtime.now() + 2 * period_s)
    runtime.admit(admission, token.to_bytes())


async def keep_organizer_token(runtime: LiveRuntime, admission: Admission, organizer: RSAPrivateKey, period_s: float) -> None:
    """The organizer, once admitted: re-sign its own token every ``period_s``."""
    while True:
        await asyncio.sleep(period_s)
        admit_organizer(runtime, admission, organizer, period_s)


def main(argv: list[str] | None = None) -> None:
    """``python -m swarm.admission peer-id KEY`` | ``issue --organizer-identity KEY --run-id R --peer-id P ...``."""
    parser = argparse.ArgumentParser(prog="python -m swarm.admission", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    peer = commands.add_parser("peer-id", help="print the peer id of an identity file (created if missing)")
    peer.add_argument("identity", type=Path, help="the peer's swarm.identity_path")
    signing = commands.add_parser("issue", help="sign an admission token (the organizer)")
    signing.add_argument("--organizer-identity", type=Path, required=True, help="the bootstrap's swarm.identity_path")
    signing.add_argument("--run-id", required=True)
    signing.add_argument("--peer-id", required=True, help="what `peer-id` printed for the volunteer")
    signing.add_argument("--hours", type=float, default=24.0, help="how long the token admits the peer")
    signing.add_argument("--out", type=Path, required=True, help="the token file (the volunteer's swarm.admission_token)")
    args = parser.parse_args(argv)
    try:
        if args.command == "peer-id":
            print(rsa_peer_id(ensure_identity(args.identity).get_public_key().to_bytes()))
            return
        if args.hours <= 0:
            raise SwarmError(f"--hours must be > 0, got {args.hours}")
        _check_peer_id(args.peer_id)
        expires_at = time.time() + args.hours * 3600  # DHT time is wall time (hivemind.utils.get_dht_time)
        token = issue(load_identity(args.organizer_identity), args.run_id, args.peer_id, expires_at)
        args.out.write_bytes(token.to_bytes())
        print(f"admission token for {args.peer_id} in run {args.run_id!r}, valid {args.hours:g} h: {args.out}")
    except SwarmError as error:
        print(f"swarm.admission: {error}", file=sys.stderr)
        sys.exit(2)


def _check_peer_id(peer_id: str) -> None:
    """Refuse a string that is no RSA peer's libp2p id, a base58 sha2-256 multihash (a typo would make a token that
    admits nobody)."""
    try:
        digest = PeerID.from_base58(peer_id).to_bytes()
    except ValueError:
        digest = b""
    if not (digest.startswith(SHA256_MULTIHASH_PREFIX) and len(digest) == len(SHA256_MULTIHASH_PREFIX) + 32):
        raise SwarmError(f"--peer-id {peer_id!r} is not a libp2p peer id (copy what `peer-id` printed)")


if __name__ == "__main__":
    main()
