"""tools/generate_script.py: the start script a volunteer runs."""

import os
import shlex

import pytest

from tools.generate_script import main as generate

PEER = "/ip4/203.0.113.5/tcp/49200/p2p/QmXToRqVE7S43fLu9vu7KqNFy3L7qTVLC6cQ7ayxcEnFpn"


def test_the_script_is_written_into_a_new_folder_executable_with_the_servers_settings(tmp_path):
    script = generate([
        "--initial_peers", PEER, "--organizer_key", "1a2b3c4d5e6f7a8b", "--run_id", "my run", "--host_port", "49201",
        "--announce_host", "198.51.100.7", "--announce_port", "40000", "--gpu_id", "1",
        "--output", str(tmp_path / "new" / "folder" / "start_server.sh"),
    ])
    assert os.access(script, os.X_OK)
    command = shlex.split(script.read_text().splitlines()[-1])
    assert command[0] == "exec" and command[-1] == "$@"
    assert {"backend=swarm", "swarm.role=server", "run_id=my run", f"swarm.initial_peers=[{PEER}]",
            "swarm.organizer_key=1a2b3c4d5e6f7a8b", "swarm.host_port=49201", "swarm.announce_host=198.51.100.7",
            "swarm.announce_port=40000", "swarm.device=cuda:1",
            f"swarm.identity_path={tmp_path / 'new' / 'folder' / 'private.key'}"} <= set(command)


@pytest.mark.parametrize("args,complaint", [
    (["--initial_peers", "/ip4/203.0.113.5/tcp/49200"], "not a full multiaddr"),
    (["--initial_peers", PEER, "--host_port", "70000"], "not a TCP port"),
])
def test_bad_arguments_are_refused_with_the_reason(tmp_path, capsys, args, complaint):
    with pytest.raises(SystemExit):
        generate([*args, "--organizer_key", "ab", "--output", str(tmp_path / "s.sh")])
    assert complaint in capsys.readouterr().err
