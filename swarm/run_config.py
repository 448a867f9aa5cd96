"""The run configuration in the DHT, signed by the organizer, so that every peer trains the same run.

The bootstrap stores the resolved config (model, stage layout, compression and its basis seed,
optimizer, averaging, data, batch sizes) under ``<run_id>/run_config``, in a subkey that holds
its RSA public key (``[owner:...]``): hivemind's ``RSASignatureValidator`` then requires every
version of that record to carry a valid signature by that key, on every DHT node. Servers and
trainers accept only the subkey whose key has the fingerprint they were given
(``swarm.organizer_key``); unsigned or foreign records are ignored with a warning.

The record expires ``swarm.run_config_lifetime_h`` after the organizer's latest refresh, and every peer that
joined re-stores the organizer's entry, bytes and expiration unchanged (so its signature stays valid), on
the DHT nodes nearest its key: joining keeps working after the organizer leaves, for as long as one such peer
is online, until that expiration.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils import get_dht_time

from node0sim.config import RunConfig, load_run_config
from swarm.lifecycle import SwarmError, fingerprint

log = logging.getLogger(__name__)

LOCAL_SECTIONS = ("swarm", "wandb")
"""Sections every peer sets for itself; all others come from the organizer."""

ORGANIZER_SWARM_KEYS = ("admission",)
"""``swarm`` keys the organizer sets for every peer: whether the run admits only peers with a token it signed."""

TRAINER_OWN_KEYS = ("steps", "allow_partial", "hedge_quantile", "probe_timeout_s")
"""``train`` keys a trainer sets for itself: how many steps it feeds, whether stopping short is an error for its process,
and whether it hedges its calls. The others (batch sizes, timeouts, bans, bounds) are the organizer's."""

REFRESH_S = 150.0
"""How often the organizer re-signs the run configuration and every joined peer re-stores it (a DHT node that
joined since holds no copy until then)."""


def config_key(run_id: str) -> str:
    """DHT key of the run configuration."""
    return f"{run_id}/run_config"


def published_part(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the organizer publishes: the resolved config without per-peer sections and Hydra's own, but with the
    :data:`ORGANIZER_SWARM_KEYS` of ``swarm``."""
    published = {k: v for k, v in config.items() if k not in LOCAL_SECTIONS and k != "hydra"}
    return {**published, "swarm": {k: config["swarm"][k] for k in ORGANIZER_SWARM_KEYS}}


def merge(published: Mapping[str, Any], local: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
    """The run as the organizer defined it, with this peer's own ``swarm`` (but the organizer's
    :data:`ORGANIZER_SWARM_KEYS`) and ``wandb`` settings and, for a trainer, its own :data:`TRAINER_OWN_KEYS` of
    ``train`` (validated, and as a plain config mapping)."""
    document = {**published, **{k: local[k] for k in LOCAL_SECTIONS}}
    document["swarm"] = {**local["swarm"], **{k: published["swarm"][k] for k in ORGANIZER_SWARM_KEYS}}
    if local["swarm"]["role"] == "trainer":
        document["train"] = {**published["train"], **{k: local["train"][k] for k in TRAINER_OWN_KEYS}}
    return load_run_config(document), document


async def publish(
    dht: DHTNode, validator: RSASignatureValidator, config: Mapping[str, Any], run_id: str, lifetime_s: float
) -> None:
    """Store (or refresh) the signed configuration, expiring ``lifetime_s`` from now."""
    stored = await dht.store(
        config_key(run_id), published_part(config), get_dht_time() + lifetime_s, subkey=validator.local_public_key
    )
    if not stored:
        log.warning("the run configuration could not be stored in the DHT yet; retrying at the next refresh")


async def keep_publishing(
    dht: DHTNode, validator: RSASignatureValidator, config: Mapping[str, Any], run_id: str, lifetime_s: float
) -> None:
    """Refresh the record every :data:`REFRESH_S` (the bootstrap does this for as long as it runs)."""
    while True:
        await publish(dht, validator, config, run_id, lifetime_s)
        await asyncio.sleep(REFRESH_S)


def held_copy(dht: DHTNode, run_id: str, organizer_key: str) -> tuple[bytes, bytes, float] | None:
    """The organizer's entry as this DHT node holds it, in its storage or its cache of what it read: the subkey, the
    value bytes with their signature, the expiration; None if it holds no unexpired one."""
    key_id = DHTID.generate(source=config_key(run_id))
    for storage in (dht.protocol.storage, dht.protocol.cache):
        found = storage.get(key_id)
        if found is None or not isinstance(found.value, DictionaryDHTValue):
            continue
        for subkey, (value, expiration) in found.value.items():
            if signer_fingerprint(subkey) == organizer_key and expiration > get_dht_time():
                return subkey, value, expiration
    return None


async def restore_copy(dht: DHTNode, run_id: str, organizer_key: str) -> int:
    """Store the organizer's entry that this node holds, unchanged, on the DHT nodes now nearest its key (this one
    included); returns how many took it (0 if this node holds none; a node holding this version or a later one
    refuses, so 0 may also mean that every one of them holds it already)."""
    held = held_copy(dht, run_id, organizer_key)
    if held is None:
        return 0
    subkey, value, expiration = held
    key_id = DHTID.generate(source=config_key(run_id))
    nearest = (await dht.find_nearest_nodes([key_id], k_nearest=dht.num_replicas))[key_id]
    others = [peer for node_id, peer in nearest.items() if node_id != dht.node_id]
    replies = await asyncio.gather(*(dht.protocol.call_store(peer, [key_id], [value], expiration, [subkey]) for peer in others))
    stored = sum(bool(reply and reply[0]) for reply in replies)
    if dht.node_id in nearest:
        stored += dht.protocol.storage.store_subkey(key_id, subkey, value, expiration)
    return stored


async def keep_restoring(dht: DHTNode, run_id: str, organizer_key: str) -> None:
    """Every :data:`REFRESH_S`: read the newest organizer-signed configuration (this node keeps a copy of what it reads)
    and store that copy on the nodes nearest its key (every joined peer does this for as long as it runs)."""
    while True:
        await asyncio.sleep(REFRESH_S)
        try:
            await dht.get(config_key(run_id), latest=True)
            await restore_copy(dht, run_id, organizer_key)
        except Exception as error:  # the DHT's own failures: try again at the next period
            log.warning("could not re-store the run configuration (%s); retrying in %g s", error, REFRESH_S)


def signer_fingerprint(subkey: Any) -> str | None:
    """Fingerprint of the owner key in a ``[owner:...]`` subkey; None for unsigned subkeys."""
    if not isinstance(subkey, bytes):
        return None
    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)  # the validator's own owner-marker pattern
    return fingerprint(keys[0]) if len(keys) == 1 else None


async def fetch(dht: DHTNode, run_id: str, organizer_key: str, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
    """The published configuration signed by ``organizer_key``; waits up to ``timeout_s`` for it."""
    deadline = get_dht_time() + timeout_s
    ignored: set[str] = set()
    while True:
        found = await dht.get(config_key(run_id), latest=True)
        records = found.value if found is not None and isinstance(found.value, dict) else {}
        for subkey, item in records.items():
            signer = signer_fingerprint(subkey)
            if signer == organizer_key and isinstance(item.value, dict):
                return item.value
            label = signer or "unsigned"
            if label not in ignored:
                ignored.add(label)
                log.warning("Ignored a run configuration for %r signed by %s (expected %s)", run_id, label, organizer_key)
        if get_dht_time() > deadline:
            raise SwarmError(
                f"no run configuration for run_id={run_id!r} signed by {organizer_key} appeared in the DHT within "
                f"{timeout_s:g} s: check that the bootstrap runs with the same run_id and that swarm.organizer_key is the "
                "fingerprint it printed" + (f" (found records signed by: {sorted(ignored)})" if ignored else "")
            )
        await asyncio.sleep(poll_s)
