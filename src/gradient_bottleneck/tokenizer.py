"""Byte-level BPE tokenizers of any vocabulary size, trained on the corpus's train split.

Trained tokenizers and encoded token streams are cached under .cache/ with a key made of the
corpus hash and V, so a changed corpus never reuses a stale tokenizer.
"""

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import CORPUS_DIR, corpus_hash, load_documents
from .paths import CACHE_DIR
from .results import atomic_write_bytes

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # 256 byte symbols plus the end-of-text token


def _cache_key(vocab_size: int, corpus_dir: Path) -> str:
    return f"bpe-{corpus_hash(corpus_dir)[:16]}-V{vocab_size}"


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer vocabulary size V={vocab_size!r} must be an integer >= {MIN_VOCAB_SIZE} "
            "(256 byte symbols + end-of-text); use e.g. V=8192"
        )


def train_tokenizer(vocab_size: int, corpus_dir: Path = CORPUS_DIR) -> Tokenizer:
    """Train a byte-level BPE tokenizer with exactly `vocab_size` tokens on the train split."""
    _check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [doc.text for doc in load_documents("train", corpus_dir)]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    actual = tokenizer.get_vocab_size()
    if actual != vocab_size:
        raise ValueError(
            f"the corpus supports only {actual} BPE tokens, fewer than the requested V={vocab_size}; "
            f"choose V <= {actual} or add text to data/corpus/train"
        )
    return tokenizer


def load_tokenizer(vocab_size: int, corpus_dir: Path = CORPUS_DIR, cache_dir: Path = CACHE_DIR) -> Tokenizer:
    """Return the cached tokenizer for (corpus, V), training and caching it on first use."""
    _check_vocab_size(vocab_size)
    path = Path(cache_dir) / "tokenizers" / f"{_cache_key(vocab_size, corpus_dir)}.json"
    if path.exists():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise RuntimeError(
                f"tokenizer cache {path} is unreadable ({exc}); delete that file to retrain it"
            ) from exc
        if tokenizer.get_vocab_size() != vocab_size:
            raise RuntimeError(
                f"tokenizer cache {path} has V={tokenizer.get_vocab_size()}, expected {vocab_size}; "
                "delete that file to retrain it"
            )
        return tokenizer
    log.info("training BPE tokenizer vocab_size=%d", vocab_size)
    tokenizer = train_tokenizer(vocab_size, corpus_dir)
    atomic_write_bytes(path, tokenizer.to_str().encode("utf-8"))
    log.info("tokenizer cached path=%s", path)
    return tokenizer


@dataclass(frozen=True)
class TokenStream:
    """One split encoded as a single stream, documents joined by the end-of-text token."""

    tokens: torch.Tensor  # (N,) int64 token ids
    doc_starts: torch.Tensor  # (n_docs,) int64 offset of each document's first token
    doc_names: tuple[str, ...]
    vocab_size: int

    def document_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Return the document index of each token position."""
        return torch.searchsorted(self.doc_starts, positions, right=True) - 1


def encode_split(split: str, vocab_size: int, corpus_dir: Path = CORPUS_DIR,
                 cache_dir: Path = CACHE_DIR) -> TokenStream:
    """Encode a corpus split with the (corpus, V) tokenizer, caching the ids as .npy files."""
    tokenizer = load_tokenizer(vocab_size, corpus_dir, cache_dir)
    documents = load_documents(split, corpus_dir)
    folder = Path(cache_dir) / "tokens" / _cache_key(vocab_size, corpus_dir)
    ids_path, starts_path = folder / f"{split}.npy", folder / f"{split}.starts.npy"
    if ids_path.exists() and starts_path.exists():
        try:
            ids = np.load(ids_path, allow_pickle=False)
            starts = np.load(starts_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"token cache {folder} is unreadable ({exc}); delete that folder to re-encode") from exc
    else:
        eot = tokenizer.token_to_id(END_OF_TEXT)
        encoded = tokenizer.encode_batch([doc.text for doc in documents])
        pieces, starts, offset = [], [], 0
        for enc in encoded:
            starts.append(offset)
            pieces.append(np.asarray(enc.ids + [eot], dtype=np.int32))
            offset += len(enc.ids) + 1
        ids, starts = np.concatenate(pieces), np.asarray(starts, dtype=np.int64)
        for path, array in ((ids_path, ids), (starts_path, starts)):
            buffer = _npy_bytes(array)
            atomic_write_bytes(path, buffer)
    return TokenStream(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(starts),
                       tuple(doc.name for doc in documents), vocab_size)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
