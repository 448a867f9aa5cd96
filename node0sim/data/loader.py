"""Document sources, a hash-based train/validation split, and token batch streams."""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .corpus import cache_dir, embedded_documents
from .tokenizer import Tokenizer, load_tokenizer

SOURCES = ("embedded", "files", "fineweb_edu")
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"

T = TypeVar("T")


def resolve_files(patterns: Iterable[str]) -> list[str]:
    """Expand paths and glob patterns (``~`` and ``**`` allowed) into a sorted, deduplicated file list.

    Raises ``ValueError`` naming any pattern that matches no file.
    """
    found: set[str] = set()
    for pattern in patterns:
        matches = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"data.files: {pattern!r} matches no file")
        found.update(os.path.abspath(m) for m in matches)
    return sorted(found)


def file_builder(files: Iterable[str]) -> str:
    """The ``datasets`` builder ("text", "json" or "parquet") for files that share one extension kind."""
    builders = set()
    for f in files:
        ext = Path(f).suffix.lower()
        if ext not in FILE_BUILDERS:
            raise ValueError(f"data.files: unsupported extension of {f!r}; allowed: {', '.join(FILE_BUILDERS)}")
        builders.add(FILE_BUILDERS[ext])
    if len(builders) != 1:
        raise ValueError(f"data.files: all files must be of one kind (text, json or parquet), got {sorted(builders)}")
    return builders.pop()


@dataclass
class DataConfig:
    """Where training text comes from and how it is tokenized and split.

    ``source``: "embedded" (standard-library docstrings, offline), "files" (local text/json/jsonl/parquet
    files, globs allowed) or "fineweb_edu" (streamed from the Hugging Face Hub, needs network).
    ``.txt`` files yield one document per paragraph (blank-line separated).
    """

    source: str = "embedded"
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    tokenizer: str = "byte"
    validation_fraction: float = 0.05
    fineweb_name: str = "sample-10BT"
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source: unknown value {self.source!r}; allowed: {', '.join(SOURCES)}")
        if isinstance(self.files, str):
            self.files = [self.files]
        self.files = [str(f) for f in self.files]
        if not isinstance(self.validation_fraction, (int, float)) or not 0 < self.validation_fraction <= 0.5:
            raise ValueError(
                f"data.validation_fraction: must be a number in (0, 0.5], got {self.validation_fraction!r}"
            )
        for name in ("text_field", "tokenizer", "fineweb_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name}: must be a non-empty string, got {value!r}")
        if self.max_documents is not None and (
            isinstance(self.max_documents, bool) or not isinstance(self.max_documents, int) or self.max_documents < 1
        ):
            raise ValueError(f"data.max_documents: must be null or a positive integer, got {self.max_documents!r}")
        if self.source == "files":
            if not self.files:
                raise ValueError("data.files: source=files needs at least one file path or glob pattern")
            file_builder(resolve_files(self.files))


class _TextColumn:
    """Re-iterable view of the string column ``field_name`` of a ``datasets`` dataset.

    Values are stripped of surrounding whitespace; empty and null values are skipped.
    """

    def __init__(self, dataset: Any, field_name: str, limit: int | None) -> None:
        self._dataset = dataset.select_columns([field_name])
        self._field = field_name
        self._limit = limit

    def __iter__(self) -> Iterator[str]:
        rows = (text for batch in self._dataset.iter(batch_size=1000) for text in batch[self._field])
        for text in itertools.islice(rows, self._limit):
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"data.text_field: column {self._field!r} holds {type(text).__name__}, not text")
            text = text.strip()
            if text:
                yield text


def load_documents(cfg: DataConfig) -> Iterable[str]:
    """The documents of ``cfg.source`` as a re-iterable (every ``iter()`` starts from the beginning).

    Raises ``ValueError`` for a missing text column and ``RuntimeError`` when FineWeb-Edu is unreachable.
    """
    import datasets

    if cfg.source == "embedded":
        return embedded_documents()[: cfg.max_documents]
    if cfg.source == "files":
        files = resolve_files(cfg.files)
        builder = file_builder(files)
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(
            builder, data_files=files, split="train", cache_dir=str(cache_dir() / "hf_datasets"), **extra
        )
        if cfg.text_field not in ds.column_names:
            raise ValueError(
                f"data.text_field: column {cfg.text_field!r} not found in data.files; "
                f"columns present: {', '.join(ds.column_names)}"
            )
        return _TextColumn(ds, cfg.text_field, cfg.max_documents)
    try:
        ds = datasets.load_dataset(FINEWEB_EDU_REPO, name=cfg.fineweb_name, split="train", streaming=True)
    except Exception as err:  # offline/connection/unknown-config errors differ across datasets versions
        raise RuntimeError(
            f"could not open {FINEWEB_EDU_REPO} (config {cfg.fineweb_name!r}): {type(err).__name__}: {err}. "
            "FineWeb-Edu is streamed from the Hugging Face Hub and needs network access; without it use "
            "data=embedded (the built-in offline corpus) or data.source=files with local files."
        ) from err
    return _TextColumn(ds, "text", cfg.max_documents)


def is_validation_document(text: str, fraction: float) -> bool:
    """Whether ``text`` belongs to the validation split: a stable hash of its content, mapped to [0, 1)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class _SplitView:
    """Re-iterable filter keeping the training or the validation side of a document source."""

    def __init__(self, documents: Iterable[str], fraction: float, validation: bool) -> None:
        self._documents = documents
        self._fraction = fraction
        self._validation = validation

    def __iter__(self) -> Iterator[str]:
        return (d for d in self._documents if is_validation_document(d, self._fraction) == self._validation)


def split_documents(documents: Iterable[str], fraction: float) -> tuple[Iterable[str], Iterable[str]]:
    """(train, validation) re-iterable views of ``documents``, split by content hash.

    The assignment of a document does not depend on order or on how many documents are read.
    """
    return _SplitView(documents, fraction, False), _SplitView(documents, fraction, True)


def _shuffled(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """Approximate shuffle with a bounded buffer, so unbounded streams can be shuffled."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class TokenBatches:
    """Batches of token windows cut from tokenized documents joined by EOS.

    Each batch is a LongTensor of shape ``[batch_size, seq_len + 1]``; use ``batch[:, :-1]`` as inputs and
    ``batch[:, 1:]`` as targets. The training stream is infinite: every pass over ``documents`` shuffles
    documents and windows with bounded buffers (``shuffle_buffer`` items each) seeded from ``seed`` and the
    pass number, so results are deterministic for a seed. ``documents`` must be re-iterable (not a one-shot
    iterator), since each pass iterates it anew.
    """

    def __init__(
        self,
        documents: Iterable[str],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle_buffer: int = 1024,
    ) -> None:
        if iter(documents) is documents:
            raise TypeError("TokenBatches needs a re-iterable document source (e.g. a list), not an iterator")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("shuffle_buffer", shuffle_buffer)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.documents = documents
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._stream = self._windows_forever(shuffle=True)

    def _cut(self, docs: Iterable[str]) -> Iterator[list[int]]:
        """Concatenate tokenized documents, each followed by EOS, and cut into ``seq_len + 1`` windows."""
        window = self.seq_len + 1
        buffer: list[int] = []
        total = 0
        for doc in docs:
            ids = self.tokenizer.encode(doc)
            ids.append(self.tokenizer.eos_id)
            total += len(ids)
            buffer.extend(ids)
            n = len(buffer) // window
            for i in range(n):
                yield buffer[i * window : (i + 1) * window]
            del buffer[: n * window]
        if total < window:
            raise ValueError(
                f"the document source has only {total} tokens, fewer than one window of "
                f"seq_len + 1 = {window} tokens; use more data or a shorter train.seq_len"
            )

    def _windows(self, rng: random.Random | None) -> Iterator[list[int]]:
        """One pass over the documents; documents and windows are shuffled when ``rng`` is given."""
        if rng is None:
            return self._cut(self.documents)
        return _shuffled(self._cut(_shuffled(self.documents, self.shuffle_buffer, rng)), self.shuffle_buffer, rng)

    def _windows_forever(self, shuffle: bool) -> Iterator[list[int]]:
        """Cycle over passes; each shuffled pass uses its own seed derived from ``seed``."""
        for epoch in itertools.count():
            yield from self._windows(random.Random(f"{self.seed}:{epoch}") if shuffle else None)

    def _take_batch(self, windows: Iterator[list[int]]) -> torch.Tensor:
        return torch.tensor(list(itertools.islice(windows, self.batch_size)), dtype=torch.long)

    def next_batch(self) -> torch.Tensor:
        """The next training batch, shape ``[batch_size, seq_len + 1]``, dtype ``torch.long``."""
        return self._take_batch(self._stream)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def validation_batches(self, n: int) -> list[torch.Tensor]:
        """``n`` fixed batches from the documents in order, unshuffled (cycling if they are too few).

        Independent of the training stream's position: every call returns the same batches.
        """
        stream = self._windows_forever(shuffle=False)
        return [self._take_batch(stream) for _ in range(n)]


def build_data(
    cfg: DataConfig, seq_len: int, batch_size: int, seed: int, num_validation_batches: int = 4
) -> tuple[TokenBatches, list[torch.Tensor], Tokenizer]:
    """Train stream, fixed validation batches and tokenizer for ``cfg``."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    train_docs, val_docs = split_documents(load_documents(cfg), cfg.validation_fraction)
    train = TokenBatches(train_docs, tokenizer, seq_len, batch_size, seed)
    try:
        validation = TokenBatches(val_docs, tokenizer, seq_len, batch_size, seed).validation_batches(
            num_validation_batches
        )
    except ValueError as err:
        raise ValueError(f"validation split (data.validation_fraction={cfg.validation_fraction}): {err}") from err
    return train, validation, tokenizer
