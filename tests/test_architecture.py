"""The protocol is written once and the two backends are independent adapters of it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {"simpy", "hivemind", "swarm", "asyncio"}


def _imports(path: Path) -> set[str]:
    """Top-level packages ``path`` imports, plus ``node0sim.sim`` when it imports the simulator."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
            names.update("node0sim.sim" for alias in node.names if _is_simulator(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
            if _is_simulator(node.module):
                names.add("node0sim.sim")
    return names


def _is_simulator(module: str) -> bool:
    return module == "node0sim.sim" or module.startswith("node0sim.sim.")


def _offenders(files: list[Path], forbidden: set[str]) -> dict[str, set[str]]:
    assert len(files) > 3
    return {str(path.relative_to(ROOT)): bad for path in files if (bad := _imports(path) & forbidden)}


def test_protocol_and_runtime_import_no_backend():
    files = sorted((ROOT / "node0sim" / "protocol").glob("*.py")) + [ROOT / "node0sim" / "runtime.py"]
    assert not _offenders(files, BACKENDS | {"node0sim.sim"})


def test_the_backend_independent_run_assembly_imports_no_backend():
    files = [ROOT / "node0sim" / name for name in ("assembly.py", "summary.py", "experiment.py", "metrics.py")]
    assert not _offenders(files, BACKENDS | {"node0sim.sim"})


def test_the_live_backend_does_not_import_the_simulator():
    assert not _offenders(sorted((ROOT / "swarm").glob("*.py")), {"node0sim.sim", "simpy"})


def test_the_simulator_does_not_import_the_live_backend():
    assert not _offenders(sorted((ROOT / "node0sim" / "sim").glob("*.py")), {"swarm", "hivemind"})


def test_import_check_catches_a_backend_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import simpy\nfrom hivemind.dht import DHT\nfrom node0sim.sim.engine import wait\n")
    assert _imports(sample) >= {"simpy", "hivemind", "node0sim.sim"}
    sample.write_text("def f():\n    import node0sim.sim.runner\n    from swarm import roles\n")  # inside a function too
    assert _imports(sample) >= {"node0sim.sim", "swarm"}
    sample.write_text("from node0sim.summary import RunSummary\nimport node0sim.simple\n")
    assert "node0sim.sim" not in _imports(sample)
