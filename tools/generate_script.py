"""Write ``start_server.sh``: the one command a volunteer runs to join a live node0sim swarm as a stage server.

    python tools/generate_script.py --initial_peers /ip4/203.0.113.5/tcp/49200/p2p/Qm... \\
        --organizer_key 1a2b3c4d5e6f7a8b --host_port 49200 --announce_port 49200 [--gpu_id 0]
    ./start_server.sh            # extra Hydra overrides are passed through: ./start_server.sh swarm.stage=2

The script runs ``node0sim backend=swarm swarm.role=server`` with these settings and a persistent
identity (``private.key`` next to the script, created owner-only on first start): stop it with
Ctrl-C, start it again and the peer rejoins under the same peer id.
"""

from __future__ import annotations

import argparse
import shlex
import stat
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def _maddr(text: str) -> str:
    if not text.startswith("/ip") or "/tcp/" not in text or "/p2p/" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a full multiaddr like /ip4/<ip>/tcp/<port>/p2p/<peer id> (copy it from the bootstrap's output)"
        )
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (Node0's names where they exist)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--initial_peers", nargs="+", type=_maddr, required=True, help="multiaddrs printed by the bootstrap")
    parser.add_argument("--organizer_key", required=True, help="key fingerprint printed by the bootstrap")
    parser.add_argument("--run_id", default="node0sim", help="the run to join (as printed by the bootstrap)")
    parser.add_argument("--host_port", type=_port, default=49200, help="port this peer listens on")
    parser.add_argument("--announce_host", default=None, help="public IP others should dial (behind NAT with a forwarded port)")
    parser.add_argument("--announce_port", type=_port, default=None, help="public port others should dial")
    parser.add_argument("--gpu_id", type=int, default=None, help="CUDA device index (default: CPU)")
    parser.add_argument(
        "--identity_path", type=Path, default=None, help="identity key file (default: private.key next to the script)"
    )
    parser.add_argument("--python", default=sys.executable, help="python of the environment node0sim is installed in")
    parser.add_argument("--output", type=Path, default=Path("start_server.sh"))
    return parser.parse_args(argv)


def server_command(args: argparse.Namespace) -> list[str]:
    """The ``node0sim`` command line of the server."""
    identity = (args.identity_path or args.output.resolve().parent / "private.key").resolve()
    command = [
        args.python, "-m", "node0sim", "backend=swarm", "swarm.role=server", f"run_id={args.run_id}",
        f"swarm.initial_peers=[{','.join(args.initial_peers)}]", f"swarm.organizer_key={args.organizer_key}",
        f"swarm.host_port={args.host_port}", f"swarm.identity_path={identity}",
        f"swarm.device={'cpu' if args.gpu_id is None else f'cuda:{args.gpu_id}'}",
    ]
    if args.announce_host is not None:
        command.append(f"swarm.announce_host={args.announce_host}")
    if args.announce_port is not None:
        command.append(f"swarm.announce_port={args.announce_port}")
    return command


def script_text(args: argparse.Namespace) -> str:
    """The content of ``start_server.sh``."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "#!/usr/bin/env bash\n"
        f"# node0sim stage server, written by tools/generate_script.py on {when}; run it again to change settings.\n"
        "# Ctrl-C stops the server cleanly; restarting rejoins with the same identity (private.key).\n"
        "set -euo pipefail\n"
        f"cd {shlex.quote(str(REPO))}\n"
        f"exec {' '.join(shlex.quote(part) for part in server_command(args))} \"$@\"\n"
    )


def main(argv: list[str] | None = None) -> Path:
    """Write the script (executable) and say how to run it."""
    args = parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(script_text(args))
    args.output.chmod(args.output.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    command = args.output if args.output.is_absolute() or args.output.parent != Path(".") else f"./{args.output}"
    print(f"wrote {args.output}; start the server with {command}")
    return args.output


if __name__ == "__main__":
    main()
