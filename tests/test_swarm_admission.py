"""Admission (``swarm.admission=token``): tokens signed by the organizer, refused calls and record entries of peers
without one, and the joiner's own check with its message."""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from node0sim.protocol.averaging import Ack, ReducePart
from node0sim.runtime import RemoteError
from swarm import admission
from swarm.admission import Admission, AdmissionError
from swarm.lifecycle import SwarmError, ensure_identity, fingerprint, rsa_peer_id
from swarm.local import LocalSwarm
from swarm.node import LiveNode, NodeSettings
from tests.runs import MINIMAL

RUN = "admission-test"
NOW = 1_000_000.0
LIVE = ["train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=32", "train.eval_batches=1", "wandb.enabled=false",
        f"run_id={RUN}", MINIMAL]


@pytest.fixture(scope="module")
def organizer(tmp_path_factory):
    return ensure_identity(tmp_path_factory.mktemp("keys") / "organizer.key")


def _peer(folder: Path, name: str) -> str:
    return rsa_peer_id(ensure_identity(folder / f"{name}.key").get_public_key().to_bytes())


def _rule(organizer) -> Admission:
    return Admission(RUN, fingerprint(organizer.get_public_key().to_bytes()))


def test_a_token_admits_exactly_its_peer_in_its_run_until_it_expires(organizer, tmp_path):
    peer, other = _peer(tmp_path, "peer"), _peer(tmp_path, "other")
    token = admission.issue(organizer, RUN, peer, NOW + 60).to_bytes()
    rule = _rule(organizer)
    assert rule.check(token, peer, NOW).peer_id == peer
    with pytest.raises(AdmissionError, match=f"peer {other} presented the admission token of {peer}"):
        rule.check(token, other, NOW)
    with pytest.raises(AdmissionError, match="expired 1 s ago"):
        rule.check(token, peer, NOW + 61)
    with pytest.raises(AdmissionError, match="is for run 'admission-test', not 'other-run'"):
        Admission("other-run", rule.organizer_key).check(token, peer, NOW)
    with pytest.raises(AdmissionError, match="presented no admission token"):
        rule.check(b"", peer, NOW)


def test_forged_altered_foreign_and_malformed_tokens_are_refused_with_the_reason(organizer, tmp_path):
    peer, thief = _peer(tmp_path, "peer"), _peer(tmp_path, "thief")
    rule = _rule(organizer)
    fields = json.loads(admission.issue(organizer, RUN, peer, NOW + 60).to_bytes())
    altered = json.dumps({**fields, "peer_id": thief}).encode()  # the thief writes its own id into a valid token
    with pytest.raises(AdmissionError, match="invalid signature"):
        rule.check(altered, thief, NOW)
    extended = json.dumps({**fields, "expires_at": NOW + 10**6}).encode()
    with pytest.raises(AdmissionError, match="invalid signature"):
        rule.check(extended, peer, NOW)
    impostor = ensure_identity(tmp_path / "impostor.key")  # a valid token signed by another key
    with pytest.raises(AdmissionError, match=f"not by the organizer {rule.organizer_key}"):
        rule.check(admission.issue(impostor, RUN, thief, NOW + 60).to_bytes(), thief, NOW)
    for junk in (b"\xff\x00", b"[]", b'{"run_id": 1}', json.dumps({**fields, "organizer_public_key": "ssh-rsa AAAA"}).encode()):
        with pytest.raises(AdmissionError):
            rule.check(junk, peer, NOW)
    with pytest.raises(AdmissionError, match="over the 4096-byte limit"):
        rule.check(b" " * 5000, peer, NOW)


def test_a_joiner_checks_its_own_token_and_says_how_to_get_one(organizer, tmp_path):
    peer = _peer(tmp_path, "peer")
    rule = _rule(organizer)
    with pytest.raises(SwarmError, match=f"has none: ask the organizer.*--peer-id {peer}"):
        admission.load_own_token(None, rule, peer, NOW)
    with pytest.raises(SwarmError, match="cannot read it"):
        admission.load_own_token(str(tmp_path / "missing.token"), rule, peer, NOW)
    path = tmp_path / "peer.token"
    path.write_bytes(admission.issue(organizer, RUN, peer, NOW + 60).to_bytes())
    assert admission.load_own_token(str(path), rule, peer, NOW) == path.read_bytes()
    with pytest.raises(SwarmError, match="does not admit this peer: the admission token of .* expired"):
        admission.load_own_token(str(path), rule, peer, NOW + 120)


def test_the_command_line_prints_peer_ids_and_issues_tokens(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "swarm.admission", *args], capture_output=True, text=True, timeout=60)

    printed = cli("peer-id", str(tmp_path / "volunteer.key"))
    assert printed.returncode == 0, printed.stderr
    peer = printed.stdout.strip()
    assert peer == _peer(tmp_path, "volunteer")  # the key file it created is the peer's identity
    organizer = ensure_identity(tmp_path / "organizer.key")
    issued = cli("issue", "--organizer-identity", str(tmp_path / "organizer.key"), "--run-id", RUN, "--peer-id", peer,
                 "--hours", "2", "--out", str(tmp_path / "volunteer.token"))
    assert issued.returncode == 0, issued.stderr
    token = _rule(organizer).check((tmp_path / "volunteer.token").read_bytes(), peer, time.time())
    assert 7100 < token.expires_at - time.time() <= 7200
    typo = cli("issue", "--organizer-identity", str(tmp_path / "organizer.key"), "--run-id", RUN, "--peer-id", "abc",
               "--out", str(tmp_path / "x.token"))
    assert typo.returncode == 2 and "'abc' is not a libp2p peer id" in typo.stderr


@pytest.mark.slow
def test_peers_without_a_valid_token_are_refused_on_rpc_and_their_record_entries_ignored(tmp_path, private_runtime_dir):
    """Three live peers: the organizer, an admitted peer, and an intruder that first has no token and then presents the
    admitted peer's. The intruder's calls are refused with a message naming why, and its entries are not read."""
    organizer = ensure_identity(tmp_path / "organizer.key")
    rule = _rule(organizer)

    async def main():
        keys = {name: tmp_path / f"{name}.key" for name in ("organizer", "member", "intruder")}
        host = await LiveNode.start(NodeSettings(identity_path=keys["organizer"]))
        joiners = [await LiveNode.start(NodeSettings(initial_peers=tuple(host.visible_maddrs), identity_path=keys[name]))
                   for name in ("member", "intruder")]
        member, intruder = (node.runtime for node in joiners)
        try:
            admission.admit_organizer(host.runtime, rule, organizer, 150.0)
            member.admit(rule, admission.issue(organizer, RUN, member.peer_id, time.time() + 60).to_bytes())
            host.runtime.serve("reduce_part", lambda caller, msg: _ack())
            part = ReducePart(0, "t", torch.ones(3), 1.0)
            assert isinstance(await member.call(host.runtime.peer_id, "reduce_part", part, 20), Ack)
            with pytest.raises(RemoteError, match=f"not admitted to run '{RUN}': peer {intruder.peer_id} presented no"):
                await intruder.call(host.runtime.peer_id, "reduce_part", part, 20)
            for runtime, value in ((host.runtime, "organizer"), (member, "member"), (intruder, "intruder")):
                await runtime.dht_store("stage/0", value, expires_in=60, per_peer=True)
            stolen = member.own_token
            intruder.admit(rule, stolen)  # its entries now carry a valid token, of another peer
            await intruder.dht_store("stage/1", "intruder", expires_in=60, per_peer=True)
            await member.dht_store("stage/1", "member", expires_in=60, per_peer=True)
            with pytest.raises(RemoteError, match=f"peer {intruder.peer_id} presented the admission token of {member.peer_id}"):
                await intruder.call(host.runtime.peer_id, "reduce_part", part, 20)
            for reader in (host.runtime, member):
                assert await reader.dht_get("stage/0") == {host.runtime.peer_id: "organizer", member.peer_id: "member"}
                assert await reader.dht_get("stage/1") == {member.peer_id: "member"}
                assert reader.refused_peers == {intruder.peer_id}
            await member.dht_store("stage/0", None, expires_in=0, per_peer=True)  # a withdrawal still reads as absent
            assert await host.runtime.dht_get("stage/0") == {host.runtime.peer_id: "organizer"}
        finally:
            for node in (*joiners, host):
                await node.stop()

    asyncio.run(main())



async def _ack() -> Ack:
    return Ack()


@pytest.mark.slow
def test_a_local_swarm_with_admission_trains_and_a_peer_without_a_token_is_told_why_it_cannot_join(tmp_path, private_runtime_dir):
    done = subprocess.run(
        [sys.executable, "-m", "node0sim", "backend=swarm", "swarm.role=local", "swarm.admission=token", *LIVE,
         "topology.num_stages=2", "train.steps=3", f"hydra.run.dir={tmp_path / 'run'}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_peers_per_stage"] == [1, 1], summary
    assert sorted(p.name for p in (tmp_path / "run" / "swarm").glob("*.token")) == ["s0p0.token", "s1p0.token", "trainer0.token"]
    logs = [path.read_text() for path in (tmp_path / "run" / "swarm").glob("*.log")]
    assert len(logs) == 3 and not any("is not admitted" in log for log in logs)  # every admitted peer was taken

    with LocalSwarm(LIVE, tmp_path / "peers", admission=True) as swarm:
        swarm.start_bootstrap()
        swarm.admission = False  # the next peer gets no token (and does not ask for admission itself)
        rogue = swarm.start_server("rogue", 0)
        assert rogue.wait(timeout=120) == 1
        assert f"run '{RUN}' admits only peers with a token signed by its organizer" in swarm.log_tail("rogue")
