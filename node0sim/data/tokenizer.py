"""Tokenizers: a dependency-free byte tokenizer and a wrapper around Hugging Face ``tokenizers``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import tokenizers

DEFAULT_EOS_TOKEN = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-sequence token 256."""

    vocab_size: int = 257
    eos_id: int = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode bytes as UTF-8 (invalid sequences become U+FFFD); EOS tokens are skipped."""
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json`` file.

    ``eos_id`` is the id of ``eos_token`` when the vocabulary has it, else the last id.
    """

    def __init__(self, path: str | Path, eos_token: str = DEFAULT_EOS_TOKEN) -> None:
        self.path = Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._tok.token_to_id(eos_token)
        self.eos_id: int = eos if eos is not None else self.vocab_size - 1

    @classmethod
    def from_hub(cls, repo_id: str, eos_token: str = DEFAULT_EOS_TOKEN) -> HFTokenizer:
        """Load ``tokenizer.json`` of a Hub repo (served from the local HF cache when offline)."""
        from huggingface_hub import hf_hub_download

        return cls(hf_hub_download(repo_id, "tokenizer.json"), eos_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens such as BOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens."""
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(name: str, eos_token: str = DEFAULT_EOS_TOKEN) -> Tokenizer:
    """Resolve a tokenizer name.

    ``"byte"`` gives :class:`ByteTokenizer`; an existing file, or a directory holding
    ``tokenizer.json``, is loaded locally; anything else is taken as a Hugging Face Hub repo id.
    Raises ``RuntimeError`` when the tokenizer cannot be obtained.
    """
    if name == "byte":
        return ByteTokenizer()
    path = Path(name).expanduser()
    hint = "Use data.tokenizer=byte, or data.tokenizer=<path to a tokenizer.json or a directory holding one>."
    if path.exists():
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise RuntimeError(f"tokenizer directory {str(path)!r} has no tokenizer.json. {hint}")
        try:
            return HFTokenizer(file, eos_token)
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise RuntimeError(f"could not read tokenizer file {str(file)!r}: {err}. {hint}") from err
    try:
        return HFTokenizer.from_hub(name, eos_token)
    except Exception as err:  # offline, unknown repo, invalid repo id: the types vary across huggingface_hub versions
        raise RuntimeError(
            f"could not load tokenizer {name!r}: it is not 'byte' nor an existing local path, and "
            f"tokenizer.json of the Hugging Face Hub repo {name!r} could not be fetched or found in the local "
            f"HF cache ({type(err).__name__}: {err}). Without network access the file must already be cached. {hint}"
        ) from err
