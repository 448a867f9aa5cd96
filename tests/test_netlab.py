"""The shaped-link lab: namespaces, addresses, kernel shapers, teardown and crash cleanup (needs root)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from swarm import netlab
from swarm.netlab import LinkShape, NetLab, NetLabError

REPO = Path(__file__).resolve().parent.parent
PREFIX = f"n0t{os.getpid() % 100000}-"
"""Unique per test process, so that parallel runs never touch each other's namespaces."""


def _namespaces_usable() -> str | None:
    reason = netlab.unavailable_reason()
    if reason:
        return reason
    probe = f"{PREFIX}chk"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


REASON = _namespaces_usable()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")


@pytest.fixture(autouse=True)
def _own_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NODE0SIM_RUNTIME_DIR", str(tmp_path / "rt"))


def _ours() -> list[str]:
    return [n for n in netlab.list_namespaces() if n.startswith(PREFIX)] if REASON is None else []


def test_bad_prefix_and_shape_are_refused_naming_the_problem():
    with pytest.raises(NetLabError, match="prefix"):
        NetLab("Bad Prefix!", [LinkShape(10, 10)])
    with pytest.raises(NetLabError, match="up_mbps"):
        LinkShape(0, 10)


def test_tbf_arguments_follow_the_constants():
    # 50 Mb/s: a 2 ms bucket (12,500 B) is over the 4 KiB floor; 2 Mb/s (500 B in 2 ms) gets the floor
    queue = f"{netlab.TBF_QUEUE_S * 1000:g}ms"
    assert netlab.tbf_args(50) == ["tbf", "rate", "50mbit", "burst", str(int(50e6 / 8 * netlab.TBF_BURST_S)), "latency", queue]
    assert netlab.tbf_args(2)[4] == str(netlab.TBF_MIN_BURST_BYTES)


@needs_namespaces
def test_qdisc_probe_reports_every_kind():
    found = netlab.available_qdiscs(PREFIX)
    assert set(found) == set(netlab.QDISC_PROBES) and all(isinstance(v, bool) for v in found.values())
    assert _ours() == []


@needs_namespaces
def test_lab_connects_peers_through_shaped_veths_and_is_removed_on_exit():
    received = []
    with NetLab(PREFIX, [LinkShape(20, 30), LinkShape(None, None)]) as lab:
        assert sorted(_ours()) == sorted([lab.bridge, lab.namespace(0), lab.namespace(1)])
        shown = subprocess.run(["ip", "netns", "exec", lab.namespace(0), "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
        assert "tbf" in shown and "rate 20Mbit" in shown
        down = subprocess.run(["ip", "netns", "exec", lab.bridge, "tc", "qdisc", "show", "dev", lab.bridge_port(0)],
                              capture_output=True, text=True).stdout
        assert "rate 30Mbit" in down
        server = subprocess.Popen(
            lab.command(1, [sys.executable, "-c", textwrap.dedent(f"""
                import socket
                s = socket.socket(); s.bind(("{lab.address(1)}", 5001)); s.listen(); c, _ = s.accept(); n = 0
                while (b := c.recv(65536)):
                    n += len(b)
                print(n)
            """)]), stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=lambda: received.append(server.communicate(timeout=60)[0]))
        reader.start()
        before = lab.counters(0)
        payload = 200_000
        sent = subprocess.run(lab.command(0, [sys.executable, "-c", textwrap.dedent(f"""
            import socket, time
            for _ in range(50):
                try:
                    s = socket.create_connection(("{lab.address(1)}", 5001)); break
                except OSError:
                    time.sleep(0.1)
            s.sendall(b"x" * {payload}); s.close()
        """)]), capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        reader.join()
        after = lab.counters(0)
        assert int(received[0]) == payload
        # the kernel counts the payload plus Ethernet/IP/TCP headers on the sender's veth
        assert after["tx_bytes"] - before["tx_bytes"] > payload
    assert _ours() == []


@needs_namespaces
def test_a_cut_peer_drops_traffic_without_a_reset():
    """``NetLab.cut``: a connect to the cut peer neither succeeds nor is refused: it times out (a vanished host)."""
    with NetLab(PREFIX, [LinkShape(None, None), LinkShape(None, None)]) as lab:
        listener = subprocess.Popen(lab.command(1, [sys.executable, "-c", textwrap.dedent(f"""
            import socket, time
            s = socket.socket(); s.bind(("{lab.address(1)}", 5002)); s.listen(); time.sleep(60)
        """)]))
        try:
            probe = textwrap.dedent(f"""
                import socket, sys, time
                for _ in range(50):
                    try:
                        socket.create_connection(("{lab.address(1)}", 5002), timeout=2).close(); break
                    except ConnectionRefusedError:
                        time.sleep(0.1)
                    except OSError as error:
                        sys.exit(type(error).__name__)
            """)
            assert subprocess.run(lab.command(0, [sys.executable, "-c", probe]), timeout=60).returncode == 0
            lab.cut(1)
            cut = subprocess.run(lab.command(0, [sys.executable, "-c", probe]), capture_output=True, text=True, timeout=60)
            assert cut.returncode != 0 and "timeout" in cut.stderr.lower()
        finally:
            listener.kill()
            listener.wait()
    assert _ours() == []


def test_recovery_is_measured_until_the_last_slow_step_gap():
    """``experiments/fidelity.py``'s recovery time: from the failure to the step after the last gap over 1.5x the
    final median gap."""
    sys.path.insert(0, str(REPO))
    from experiments.fidelity import recovery_s

    times = [1.0, 2.0, 3.0, 33.5, 34.5, 35.5, 36.5, 37.5, 38.5, 39.5, 40.5]  # failure at 3.2: one 30.5 s gap
    assert recovery_s(times, 3.2) == pytest.approx(33.5 - 3.2)
    assert recovery_s([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 2.5) == pytest.approx(3.0 - 2.5)  # never slow
    assert recovery_s([1.0, 2.0, 3.0], 2.5) is None  # too few steps after it


@needs_namespaces
def test_processes_left_inside_are_killed_on_close():
    lab = NetLab(PREFIX, [LinkShape(10, 10)])
    lab.build()
    sleeper = subprocess.Popen(lab.command(0, ["sleep", "300"]))
    lab.close()
    assert sleeper.wait(timeout=10) != 0
    assert _ours() == []


@needs_namespaces
def test_next_start_removes_what_a_killed_lab_left():
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from swarm.netlab import LinkShape, NetLab
        lab = NetLab({PREFIX!r}, [LinkShape(10, 10)]); lab.build()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    crashed = subprocess.run([sys.executable, "-c", script], env=os.environ, timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    assert _ours() != []
    removed = netlab.clean_leftovers(PREFIX)
    assert sorted(removed) == sorted([f"{PREFIX}br", f"{PREFIX}0"]) and _ours() == []


@needs_namespaces
def test_a_running_lab_with_the_same_prefix_is_not_torn_down():
    with NetLab(PREFIX, [LinkShape(10, 10)]) as lab:
        other = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            from swarm.netlab import clean_leftovers
            clean_leftovers({PREFIX!r})
        """)], capture_output=True, text=True, env=os.environ, timeout=60)
        assert other.returncode != 0 and "is running in process" in other.stderr
        assert lab.namespace(0) in _ours()
    assert _ours() == []


@needs_namespaces
@pytest.mark.slow
def test_a_live_bootstrap_listens_on_its_namespace_address(tmp_path):
    with NetLab(PREFIX, [LinkShape(50, 50)]) as lab:
        info = tmp_path / "bootstrap.json"
        peer = subprocess.Popen(lab.command(0, [
            sys.executable, "-m", "node0sim", "experiment=minimal", "backend=swarm", "swarm.role=bootstrap", f"swarm.host={lab.address(0)}",
            f"swarm.identity_path={tmp_path}/b.key", f"swarm.info_path={info}", f"hydra.run.dir={tmp_path}/b", "wandb.enabled=false",
        ]), env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):
                if info.is_file() or peer.poll() is not None:
                    break
                threading.Event().wait(0.2)
            assert info.is_file(), "the bootstrap did not come up inside the namespace"
            maddrs = json.loads(info.read_text())["maddrs"]
            assert any(m.startswith(f"/ip4/{lab.address(0)}/tcp/") for m in maddrs), maddrs
            # the address exists only inside the lab, not on the machine's own interfaces
            assert f" {lab.address(0)}/" not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        finally:
            peer.send_signal(signal.SIGTERM)
            peer.wait(timeout=60)
    assert _ours() == []


class _UnreachableRuntime:
    """A runtime whose calls all fail (the bootstrap does not answer the probe)."""

    async def call(self, peer, method, request, timeout):
        from node0sim.runtime import RPCError

        raise RPCError(f"{method} to peer {peer} failed: unreachable")


def test_a_failed_bandwidth_probe_falls_back_to_the_configured_uplink_with_a_warning(caplog):
    import asyncio

    from swarm.bandwidth import announced_uplink_mbps

    with caplog.at_level("WARNING", logger="node0sim.swarm"):
        assert asyncio.run(announced_uplink_mbps(_UnreachableRuntime(), "QmBoot", 80.0, 1.0)) == 80.0
    assert "announcing the configured network.up_mbps=80" in caplog.text
    assert asyncio.run(announced_uplink_mbps(_UnreachableRuntime(), None, 80.0, 1.0)) == 80.0


def test_bandwidth_probe_off_announces_the_configured_uplink_without_probing():
    import asyncio

    from swarm.bandwidth import announced_uplink_mbps

    class NoCalls:
        async def call(self, *args):
            raise AssertionError("probe_mb=0 must not call anyone")

    assert asyncio.run(announced_uplink_mbps(NoCalls(), "QmBoot", 25.0, 0.0)) == 25.0


@needs_namespaces
@pytest.mark.slow
def test_fidelity_quick_point_runs_on_both_backends(tmp_path):
    """One point of ``experiments/fidelity.py --quick`` end to end; the strict errors live in its report."""
    done = subprocess.run(
        [sys.executable, "experiments/fidelity.py", "--quick", "--only", "1", "--steps", "4", "--out", str(tmp_path)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    point = json.loads((tmp_path / "fidelity.json").read_text())["points"][0]
    assert point["live"]["summary"]["tokens_per_s_steady"] > 0
    assert abs(point["error_tcp"]) < 0.5 and abs(point["error_fluid"]) < 0.5  # loose: a shared 2-core machine
    assert (tmp_path / "fidelity.md").is_file() and (tmp_path / "fidelity.png").is_file()
    assert _ours() == [] and not [n for n in netlab.list_namespaces() if n.startswith("n0fid-")]
