"""The run configuration in the DHT, signed by the organizer, so that every peer trains the same run.

The bootstrap stores the resolved config (model, stage layout, compression and its basis seed,
optimizer, averaging, data, batch sizes) under ``<run_id>/run_config``, in a subkey that holds
its RSA public key (``[owner:...]``): hivemind's ``RSASignatureValidator`` then requires every
version of that record to carry a valid signature by that key, on every DHT node. Servers and
trainers accept only the subkey whose key has the fingerprint they were given
(``swarm.organizer_key``); unsigned or foreign records are ignored with a warning.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from node0sim.config import RunConfig, load_run_config
from swarm.lifecycle import SwarmError, fingerprint

log = logging.getLogger(__name__)

LOCAL_SECTIONS = ("swarm", "wandb")
"""Sections every peer sets for itself; all others come from the organizer."""

TRAINER_OWN_KEYS = ("steps", "allow_partial", "hedge_quantile")
"""``train`` keys a trainer sets for itself: how many steps it feeds, whether stopping short is an error for its process,
and whether it hedges its calls. The others (batch sizes, timeouts, bans, bounds) are the organizer's."""

RECORD_TTL_S = 600.0


def config_key(run_id: str) -> str:
    """DHT key of the run configuration."""
    return f"{run_id}/run_config"


def published_part(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the organizer publishes: the resolved config without per-peer sections and Hydra's own."""
    return {k: v for k, v in config.items() if k not in LOCAL_SECTIONS and k != "hydra"}


def merge(published: Mapping[str, Any], local: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
    """The run as the organizer defined it, with this peer's own ``swarm`` and ``wandb`` settings and, for a trainer,
    its own :data:`TRAINER_OWN_KEYS` of ``train`` (validated, and as a plain config mapping)."""
    document = {**published, **{k: local[k] for k in LOCAL_SECTIONS}}
    if local["swarm"]["role"] == "trainer":
        document["train"] = {**published["train"], **{k: local["train"][k] for k in TRAINER_OWN_KEYS}}
    return load_run_config(document), document


async def publish(dht: DHTNode, validator: RSASignatureValidator, config: Mapping[str, Any], run_id: str) -> None:
    """Store (or refresh) the signed configuration."""
    stored = await dht.store(
        config_key(run_id), published_part(config), get_dht_time() + RECORD_TTL_S, subkey=validator.local_public_key
    )
    if not stored:
        log.warning("the run configuration could not be stored in the DHT yet; retrying at the next refresh")


async def keep_publishing(dht: DHTNode, validator: RSASignatureValidator, config: Mapping[str, Any], run_id: str) -> None:
    """Refresh the record well before it expires (the bootstrap does this for as long as it runs)."""
    while True:
        await publish(dht, validator, config, run_id)
        await asyncio.sleep(RECORD_TTL_S / 4)


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
