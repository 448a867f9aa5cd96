"""The protocol is written once: it must not depend on a backend."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {"simpy", "hivemind", "swarm", "asyncio"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
            if node.module.startswith("node0sim.sim"):
                names.add("node0sim.sim")
    return names


def test_protocol_and_runtime_import_no_backend():
    files = sorted((ROOT / "node0sim" / "protocol").glob("*.py")) + [ROOT / "node0sim" / "runtime.py"]
    assert len(files) > 3
    for path in files:
        bad = _imports(path) & (BACKENDS | {"node0sim.sim"})
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_import_check_catches_a_backend_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import simpy\nfrom hivemind.dht import DHT\nfrom node0sim.sim.engine import wait\n")
    assert _imports(sample) >= {"simpy", "hivemind", "node0sim.sim"}
