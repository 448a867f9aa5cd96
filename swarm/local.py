"""A whole live swarm on one machine: bootstrap, stage servers and a trainer as separate processes.

Each peer is a real ``node0sim backend=swarm swarm.role=...`` process on 127.0.0.1 (or wherever ``place``
puts it, e.g. a namespace of the shaped-link lab ``swarm.netlab``), exactly what volunteers run, so the
``local`` role (and the tests) exercise the same code paths. Servers and the bootstrap log to
``<folder>/<name>.log``; with ``admission``, the bootstrap runs with ``swarm.admission=token`` and this process,
holding its key, signs every other peer's token (``<folder>/<name>.token``); ``stop()`` ends every child (SIGTERM,
then SIGKILL after a grace period) and removes what killed peers left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from node0sim.summary import ServerReport
from swarm import admission
from swarm.lifecycle import SwarmError, clean_leftovers, ensure_identity, load_identity, rsa_peer_id, runtime_dir

LOCAL_TOKEN_HOURS = 24.0
"""How long the tokens of a local swarm's peers admit them (``admission``)."""

PER_PEER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
"""Several peers share the machine's cores: one intra-op thread each avoids oversubscription."""

OWN_KEYS = ("swarm.", "+swarm.", "~swarm", "hydra.", "backend=")

Placement = Callable[[str], tuple[str, list[str]]]
"""Where peer ``name`` runs: its listen address and a command prefix (e.g. a namespace of :mod:`swarm.netlab`)."""


def on_loopback(name: str) -> tuple[str, list[str]]:
    """The default placement: every peer on 127.0.0.1 of this machine."""
    return "127.0.0.1", []


class LocalSwarm:
    """Child processes of one local swarm; ``overrides`` are the run's Hydra overrides; ``place`` says where each peer runs."""

    def __init__(
        self, overrides: Sequence[str], folder: Path, extra_env: dict[str, str] | None = None, place: Placement = on_loopback,
        admission: bool = False,
    ):
        self.overrides = [o for o in overrides if not o.startswith(OWN_KEYS)]
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **PER_PEER_ENV, **(extra_env or {})}
        self.processes: dict[str, subprocess.Popen] = {}
        self.bootstrap_info: dict[str, Any] | None = None
        self.place = place
        self.admission = admission

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def command(self, name: str, role: str, *extra: str) -> list[str]:
        """The ``node0sim`` command line of peer ``name``."""
        join = []
        if self.bootstrap_info is not None:
            join = [f"swarm.initial_peers=[{','.join(self.bootstrap_info['maddrs'])}]",
                    f"swarm.organizer_key={self.bootstrap_info['organizer_key']}"]
            if self.admission:
                join.append(f"swarm.admission_token={self.issue_token(name)}")
        elif self.admission:
            join.append("swarm.admission=token")
        host, prefix = self.place(name)
        return [
            *prefix, sys.executable, "-m", "node0sim", *self.overrides, "backend=swarm", f"swarm.role={role}", f"swarm.host={host}",
            f"swarm.identity_path={self.folder / name}.key", f"swarm.info_path={self.folder / name}.json",
            f"hydra.run.dir={self.folder / name}", *join, *extra,
        ]

    def issue_token(self, name: str) -> Path:
        """Sign an admission token for peer ``name`` (creating its identity) with the bootstrap's key; its path."""
        peer_id = rsa_peer_id(ensure_identity(self.folder / f"{name}.key").get_public_key().to_bytes())
        organizer = load_identity(self.folder / "bootstrap.key")
        expires_at = time.time() + LOCAL_TOKEN_HOURS * 3600  # DHT time is wall time
        path = self.folder / f"{name}.token"
        path.write_bytes(admission.issue(organizer, self.bootstrap_info["run_id"], peer_id, expires_at).to_bytes())
        return path

    def start(self, name: str, role: str, *extra: str, log_file: bool = True) -> subprocess.Popen:
        """Start peer ``name``; its output goes to ``<folder>/<name>.log`` (or this terminal)."""
        if name in self.processes and self.processes[name].poll() is None:
            raise SwarmError(f"peer {name} is already running")
        (self.folder / f"{name}.json").unlink(missing_ok=True)
        output = open(self.folder / f"{name}.log", "ab") if log_file else None
        try:
            process = subprocess.Popen(
                self.command(name, role, *extra), env=self.env, stdout=output, stderr=subprocess.STDOUT if output else None,
            )
        finally:
            if output is not None:
                output.close()
        self.processes[name] = process
        return process

    def start_bootstrap(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Start the organizer and wait for its multiaddrs and key fingerprint."""
        self.start("bootstrap", "bootstrap")
        self.bootstrap_info = self.wait_for_info("bootstrap", timeout_s)
        return self.bootstrap_info

    def start_server(self, name: str, stage: int | None = None, *extra: str) -> subprocess.Popen:
        """Start a stage server (at ``stage``, or where the balancing rule puts it)."""
        return self.start(name, "server", f"swarm.stage={'null' if stage is None else stage}", *extra)

    def wait_for_info(self, name: str, timeout_s: float) -> dict[str, Any]:
        """The JSON a peer writes to its ``swarm.info_path``; fails if the peer exits first."""
        path = self.folder / f"{name}.json"
        deadline = time.monotonic() + timeout_s
        while not path.is_file():
            if self.processes[name].poll() is not None:
                raise SwarmError(f"{name} exited with code {self.processes[name].returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise SwarmError(f"{name} did not come up within {timeout_s:g} s:\n{self.log_tail(name)}")
            time.sleep(0.2)
        return json.loads(path.read_text())

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The end of a peer's log (for error messages)."""
        path = self.folder / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to peer ``name`` (SIGKILL: a crash without goodbye)."""
        self.processes[name].send_signal(sig)

    def reports(self, prefix: str = "") -> dict[str, ServerReport]:
        """The exit reports (``swarm.info_path``) of the servers whose names start with ``prefix``, by name."""
        found = {}
        for name in self.processes:
            path = self.folder / f"{name}.json"
            if name.startswith(prefix) and name != "bootstrap" and path.is_file():
                found[name] = ServerReport.from_dict(json.loads(path.read_text()))
        return found

    def stop(self, grace_s: float = 30.0) -> dict[str, int]:
        """SIGTERM every running child, SIGKILL those still alive after ``grace_s``; exit codes by name."""
        running = {n: p for n, p in self.processes.items() if p.poll() is None}
        for process in running.values():
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        clean_leftovers(runtime_dir(self.env))
        return {name: process.returncode for name, process in self.processes.items()}
