"""Offline-first data pipeline: tokenizers, document sources, train/validation split and token batches."""

from .corpus import cache_dir, embedded_documents
from .loader import (
    DataConfig,
    TokenBatches,
    build_data,
    is_validation_document,
    load_documents,
    split_documents,
)
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "TokenBatches",
    "Tokenizer",
    "build_data",
    "cache_dir",
    "embedded_documents",
    "is_validation_document",
    "load_documents",
    "load_tokenizer",
    "split_documents",
]
