"""An embedded English corpus that needs no download: the docstrings of the Python standard library."""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

MIN_DOCSTRING_CHARS = 200
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def cache_dir() -> Path:
    """The node0sim cache directory: ``$NODE0SIM_CACHE`` or ``~/.cache/node0sim``."""
    return Path(os.environ.get("NODE0SIM_CACHE") or Path.home() / ".cache" / "node0sim").expanduser()


def _stdlib_files(root: Path) -> Iterator[Path]:
    """The standard library's ``.py`` files in a stable order, skipping tests and vendored trees."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one file; nothing when it does not parse."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _collect(max_chars: int) -> list[str]:
    """Scan the standard library until ``max_chars`` characters of docstrings are gathered."""
    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    for path in _stdlib_files(Path(sysconfig.get_paths()["stdlib"])):
        for doc in _docstrings(path):
            if len(doc) < MIN_DOCSTRING_CHARS or doc in seen:
                continue
            seen.add(doc)
            docs.append(doc)
            total += len(doc)
            if total >= max_chars:
                return docs
    return docs


def embedded_cache_path(max_chars: int) -> Path:
    """Where :func:`embedded_documents` caches its result for this Python version and budget."""
    version = "{}.{}.{}".format(*sys.version_info[:3])
    return cache_dir() / f"embedded_stdlib_py{version}_{max_chars}.jsonl"


def embedded_documents(max_chars: int = 3_000_000) -> list[str]:
    """Standard-library docstrings (one document each, >= 200 characters, deduplicated).

    Collection stops once ``max_chars`` characters are gathered (or the standard library is exhausted).
    The result is deterministic for a given Python installation and cached as JSONL under
    :func:`cache_dir`, so later calls only read the cache.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    path = embedded_cache_path(max_chars)
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    docs = _collect(max_chars)
    if not docs:
        raise RuntimeError(
            f"no docstrings found under the standard library at {sysconfig.get_paths()['stdlib']!r} "
            "(is this Python installed without its .py sources?); use data.source=files instead"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return docs
