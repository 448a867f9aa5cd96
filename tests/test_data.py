"""Tests of the offline data pipeline (node0sim.data); no network access is needed."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from node0sim.config import build_section
from node0sim.data import (
    ByteTokenizer,
    DataConfig,
    HFTokenizer,
    TokenBatches,
    Tokenizer,
    build_data,
    embedded_documents,
    is_validation_document,
    load_documents,
    load_tokenizer,
    split_documents,
)
from node0sim.data.corpus import embedded_cache_path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own node0sim cache directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NODE0SIM_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the default embedded corpus, built once per test session."""
    cache = tmp_path_factory.mktemp("corpus_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NODE0SIM_CACHE", str(cache))
        embedded_documents()
    return cache


@pytest.fixture
def shared_corpus(corpus_cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The default embedded corpus, served from the session cache."""
    monkeypatch.setenv("NODE0SIM_CACHE", str(corpus_cache))
    return embedded_documents()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hugging Face offline mode; the libraries read the variables at import time, so patch their copies too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def marked_documents(n: int) -> list[str]:
    """Distinct documents, each carrying a unique marker ``<doc-i>`` repeated through it."""
    return [f"<doc-{i}> " + " ".join(f"word{j} <doc-{i}>" for j in range(12)) for i in range(n)]


def decoded_windows(batches: list[torch.Tensor], tok: Tokenizer) -> str:
    return "\n".join(tok.decode(row.tolist()) for b in batches for row in b)


# --- embedded corpus ---------------------------------------------------------------------------------


def test_embedded_corpus_is_english_deterministic_and_cached(isolated_cache: Path, corpus_cache: Path) -> None:
    docs = embedded_documents()
    assert len(docs) > 500
    assert all(len(d) >= 200 for d in docs)
    assert len(set(docs)) == len(docs)
    text = "\n".join(docs)
    assert text.count(" the ") > 5000
    assert text.count(" of ") > 1000

    path = embedded_cache_path(3_000_000)
    assert path.is_file() and path.parent == isolated_cache
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == docs
    # An independent scan (the session's shared cache) gives the same documents in the same order.
    shared = (corpus_cache / path.name).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in shared] == docs

    # A second call reads the cache: altering the cache file shows up in the result.
    path.write_text(json.dumps("from the cache") + "\n", encoding="utf-8")
    assert embedded_documents() == ["from the cache"]


def test_embedded_budget_limits_size(shared_corpus: list[str]) -> None:
    docs = embedded_documents(max_chars=20_000)
    total = sum(map(len, docs))
    assert 20_000 <= total < 20_000 + max(map(len, docs))
    assert docs == shared_corpus[: len(docs)]


# --- tokenizers ------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    text = "Grüße, 東京! naïve café 🚀"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids[:3] + [tok.eos_id] + ids[3:]) == text
    assert tok.decode([0xFF]) == "\ufffd"
    assert load_tokenizer("byte").encode("ab") == [97, 98]


def train_tiny_bpe(path: Path) -> None:
    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Pipeline parallel training splits the model into stages.",
        "Each stage runs on a different peer in the swarm.",
    ]
    tok.train_from_iterator(sentences * 10, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def test_load_tokenizer_from_local_file_and_directory(tmp_path: Path, offline: None) -> None:
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    train_tiny_bpe(path)
    for name in (str(path), str(path.parent)):
        tok = load_tokenizer(name)
        assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
        assert tok.eos_id == 1  # "<|endoftext|>" is the second special token
        assert tok.vocab_size >= 256
        text = "the quick fox splits the swarm"
        ids = tok.encode(text)
        assert len(ids) < len(text)  # merges were learned
        assert tok.decode(ids) == text
    assert HFTokenizer(path, eos_token="<no such token>").eos_id == tok.vocab_size - 1


def test_load_tokenizer_unknown_repo_offline(offline: None) -> None:
    with pytest.raises(RuntimeError) as info:
        load_tokenizer("node0sim-tests/no-such-tokenizer")
    msg = str(info.value)
    assert "node0sim-tests/no-such-tokenizer" in msg and "data.tokenizer=byte" in msg and "local path" in msg


def test_load_tokenizer_directory_without_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


# --- local files -----------------------------------------------------------------------------------


def test_load_txt_jsonl_parquet(tmp_path: Path, offline: None) -> None:
    docs = marked_documents(6)
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:3]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n\n".join(docs[3:]) + "\n", encoding="utf-8")
    got = list(load_documents(DataConfig(source="files", files=[str(tmp_path / "*.txt")])))
    assert sorted(got) == sorted(docs)

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    cfg = DataConfig(source="files", files=[str(jsonl)], text_field="body", max_documents=4)
    source = load_documents(cfg)
    assert list(source) == docs[:4]
    assert list(source) == docs[:4]  # re-iterable

    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"content": docs}).to_parquet(str(parquet))
    assert list(load_documents(DataConfig(source="files", files=[str(parquet)], text_field="content"))) == docs

    with pytest.raises(ValueError, match=r"'text'.*columns present: content"):
        load_documents(DataConfig(source="files", files=[str(parquet)]))
    with pytest.raises(ValueError, match=r"'missing'.*body, id"):
        load_documents(DataConfig(source="files", files=[str(jsonl)], text_field="missing"))


def test_fineweb_offline_raises_with_suggestion(offline: None) -> None:
    with pytest.raises(RuntimeError) as info:
        load_documents(DataConfig(source="fineweb_edu"))
    msg = str(info.value)
    assert "network" in msg and "data=embedded" in msg and "data.source=files" in msg


# --- batches ---------------------------------------------------------------------------------------


def test_batch_shape_shift_and_determinism(shared_corpus: list[str]) -> None:
    docs = shared_corpus[:300]
    tok = ByteTokenizer()
    stream = TokenBatches(docs, tok, seq_len=32, batch_size=4, seed=1)
    batch = stream.next_batch()
    assert batch.shape == (4, 33) and batch.dtype == torch.long
    inputs, targets = batch[:, :-1], batch[:, 1:]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])

    first = [stream.next_batch() for _ in range(5)]
    again = TokenBatches(docs, tok, seq_len=32, batch_size=4, seed=1)
    again.next_batch()
    assert all(torch.equal(a, b) for a, b in zip(first, [again.next_batch() for _ in range(5)], strict=True))
    other = TokenBatches(docs, tok, seq_len=32, batch_size=4, seed=2)
    assert not all(torch.equal(a, b) for a, b in zip(first, [next(other) for _ in range(5)], strict=True))


def test_training_stream_is_infinite_and_reshuffles_each_pass() -> None:
    docs = marked_documents(20)
    tok = ByteTokenizer()
    stream = TokenBatches(docs, tok, seq_len=40, batch_size=2, seed=0, shuffle_buffer=8)
    windows_per_pass = sum(len(tok.encode(d)) + 1 for d in docs) // 41
    rows = [row for _ in range(3 * windows_per_pass // 2) for row in stream.next_batch()]
    assert len(rows) == 3 * windows_per_pass
    passes = [torch.stack(rows[i * windows_per_pass : (i + 1) * windows_per_pass]) for i in range(3)]
    assert not torch.equal(passes[0], passes[1]) and not torch.equal(passes[1], passes[2])


def test_too_few_tokens_and_bad_sources() -> None:
    stream = TokenBatches(["tiny"], ByteTokenizer(), seq_len=64, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        stream.next_batch()
    with pytest.raises(TypeError, match="re-iterable"):
        TokenBatches(iter(["x" * 100]), ByteTokenizer(), seq_len=8, batch_size=1, seed=0)


def test_split_is_by_content_and_validation_never_in_training(tmp_path: Path) -> None:
    docs = marked_documents(400)
    train, val = split_documents(docs, 0.1)
    train_docs, val_docs = list(train), list(val)
    assert 10 < len(val_docs) < 80 and len(train_docs) + len(val_docs) == len(docs)
    # Independent of order and of how many documents are read.
    assert set(split_documents(list(reversed(docs)), 0.1)[1]) == set(val_docs)
    assert list(split_documents(docs[:50], 0.1)[1]) == [d for d in val_docs if d in docs[:50]]
    assert all(is_validation_document(d, 0.1) for d in val_docs)

    jsonl = tmp_path / "marked.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    cfg = DataConfig(source="files", files=[str(jsonl)], validation_fraction=0.1)
    stream, validation, tok = build_data(cfg, seq_len=64, batch_size=8, seed=3)
    assert len(validation) == 4 and all(b.shape == (8, 65) for b in validation)
    assert all(torch.equal(a, b) for a, b in zip(validation, build_data(cfg, 64, 8, 3)[1], strict=True))

    val_markers = {d.split(" ", 1)[0] for d in val_docs}
    train_text = decoded_windows([stream.next_batch() for _ in range(200)], tok)
    seen_train = {m for d in train_docs if (m := d.split(" ", 1)[0]) in train_text}
    assert len(seen_train) > 0.9 * len(train_docs)  # the check below is meaningful: training text was covered
    assert not any(m in train_text for m in val_markers)
    val_text = decoded_windows(validation, tok)
    assert not any(d.split(" ", 1)[0] in val_text for d in train_docs)


@pytest.mark.usefixtures("shared_corpus")
def test_build_data_embedded_default() -> None:
    stream, validation, tok = build_data(DataConfig(), seq_len=128, batch_size=4, seed=0)
    assert isinstance(tok, ByteTokenizer)
    assert stream.next_batch().shape == (4, 129)
    assert len(validation) == 4 and validation[0].shape == (4, 129)


# --- config validation -----------------------------------------------------------------------------


def test_config_from_mapping(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"text": "hi"}\n', encoding="utf-8")
    cfg = build_section(DataConfig, {"source": "files", "files": [str(tmp_path / "*.jsonl")], "max_documents": 10}, "data")
    assert cfg.files == [str(tmp_path / "*.jsonl")] and cfg.max_documents == 10

    with pytest.raises(ValueError) as info:
        build_section(DataConfig, {"source": "embedded", "shuffle": True}, "data")
    assert "shuffle" in str(info.value) and "validation_fraction" in str(info.value)

    bad = [
        ({"source": "web"}, r"data\.source.*'web'.*embedded, files, fineweb_edu"),
        ({"validation_fraction": 0.0}, r"data\.validation_fraction.*\(0, 0\.5\]"),
        ({"validation_fraction": 0.7}, r"data\.validation_fraction"),
        ({"source": "files"}, r"data\.files.*at least one"),
        ({"source": "files", "files": [str(tmp_path / "none*.txt")]}, r"data\.files.*none\*\.txt.*matches no file"),
        ({"max_documents": 0}, r"data\.max_documents"),
        ({"text_field": ""}, r"data\.text_field"),
    ]
    for mapping, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            build_section(DataConfig, mapping, "data")

    (tmp_path / "y.csv").write_text("text\nhi\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported extension.*\.txt, \.json, \.jsonl, \.parquet"):
        DataConfig(source="files", files=[str(tmp_path / "y.csv")])
    (tmp_path / "z.txt").write_text("hi\n", encoding="utf-8")
    with pytest.raises(ValueError, match="one kind"):
        DataConfig(source="files", files=[str(tmp_path / "x.jsonl"), str(tmp_path / "z.txt")])
