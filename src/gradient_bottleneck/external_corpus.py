"""Corpora larger than the shipped one: the user's text, .jsonl or parquet files, or a Hugging
Face dataset when the user allows downloads, encoded once into flat token files.

An encoded corpus is a folder with train.tokens / heldout.tokens (int32 token ids, documents
joined by the end-of-text token), their document offsets (*.starts.npy), the tokenizer
(tokenizer.json) and meta.json. Token files are memory-mapped, so a corpus of billions of tokens
is sampled without being read into memory.
"""

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .model import ModelConfig
from .paths import CACHE_DIR
from .results import atomic_write_bytes, write_json
from .tokenizer import END_OF_TEXT, MIN_VOCAB_SIZE, TokenStream
from .train import TrainConfig, TrainResult, run_key, train

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
HF_PREFIX = "hf:"
# The paper pretrains on FineWeb-Edu; its 10B-token sample is the documented default download.
DEFAULT_HF_DATASET = "hf:HuggingFaceFW/fineweb-edu:sample-10BT"


def _source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and (p.suffix in TEXT_SUFFIXES or p.suffix in (".jsonl", ".parquet")))
        if files:
            return files
        raise FileNotFoundError(f"no .txt, .md, .jsonl or .parquet files under {path}")
    raise FileNotFoundError(f"corpus source {path} does not exist; pass a file, a folder or {HF_PREFIX}NAME")


def iter_documents(source: str, text_field: str = "text", allow_download: bool = False,
                   max_documents: int | None = None) -> Iterator[str]:
    """Yield document texts from `source`.

    source: a .txt/.md file (one document), a .jsonl file (one document per line, read from
    `text_field`), a .parquet file (column `text_field`; needs pyarrow), a folder of those, or
    "hf:NAME[:CONFIG]" for a Hugging Face dataset, streamed, which needs allow_download=True and
    the `datasets` package.
    """
    count = 0
    for text in _iter_all(source, text_field, allow_download):
        if not text.strip():
            continue
        yield text
        count += 1
        if max_documents is not None and count >= max_documents:
            return


def _iter_all(source: str, text_field: str, allow_download: bool) -> Iterator[str]:
    if source.startswith(HF_PREFIX):
        if not allow_download:
            raise PermissionError(
                f"corpus source {source!r} downloads from the Hugging Face hub; pass --allow-download "
                "(and unset HF_HUB_OFFLINE) to allow it, or point --corpus at local files"
            )
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(f"reading {source!r} needs the `datasets` package; pip install datasets") from exc
        name, _, config = source[len(HF_PREFIX):].partition(":")
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True, trust_remote_code=False)
        for row in stream:
            yield row[text_field]
        return
    for path in _source_files(Path(source)):
        if path.suffix in TEXT_SUFFIXES:
            yield path.read_text(encoding="utf-8")
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{line_number} is not valid JSON ({exc.msg})") from exc
                    if text_field not in row:
                        raise KeyError(f"{path}:{line_number} has no field {text_field!r}; set --text-field")
                    yield row[text_field]
        else:  # .parquet
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:
                raise ImportError(f"reading {path} needs the `pyarrow` package; pip install pyarrow") from exc
            parquet = pq.ParquetFile(path)
            if text_field not in parquet.schema_arrow.names:
                raise KeyError(f"{path} has no column {text_field!r}; set --text-field")
            for batch in parquet.iter_batches(columns=[text_field]):
                yield from batch.column(0).to_pylist()


def make_tokenizer(spec: str, documents: list[str]) -> Tokenizer:
    """Return a tokenizer from `spec`: a local tokenizer.json file (e.g. saved from a Hugging Face
    tokenizer), or "bpe:V" to train a byte-level BPE of V tokens on `documents`."""
    if spec.startswith("bpe:"):
        vocab_size = int(spec[4:])
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"tokenizer spec {spec!r}: V must be >= {MIN_VOCAB_SIZE}; use e.g. bpe:8192")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(documents, trainer=trainer)
        return tokenizer
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r} is neither bpe:V nor a local tokenizer.json file")
    return Tokenizer.from_file(str(path))


def _write_split(folder: Path, split: str, ids: list[np.ndarray]) -> int:
    starts = np.cumsum([0] + [len(a) for a in ids[:-1]]).astype(np.int64)
    tokens = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    atomic_write_bytes(folder / f"{split}.tokens", tokens.tobytes())
    buffer = io.BytesIO()
    np.save(buffer, starts, allow_pickle=False)
    atomic_write_bytes(folder / f"{split}.starts.npy", buffer.getvalue())
    return len(tokens)


def prepare_corpus(source: str, tokenizer_spec: str, out_dir: str | Path, heldout_fraction: float = 0.01,
                   text_field: str = "text", allow_download: bool = False, max_documents: int | None = None,
                   tokenizer_documents: int = 10_000) -> Path:
    """Encode `source` into `out_dir` (see the module docstring) unless it is already there.

    Every 1/heldout_fraction-th document goes to the held-out split, so the split is by document.
    A BPE tokenizer trained here learns from the first `tokenizer_documents` training documents.
    NOTE: documents are held in memory while encoding; corpora beyond a few GB need a streaming
    encoder writing in chunks.
    """
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").exists():
        return out_dir
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must lie in (0, 1), e.g. 0.01")
    documents = list(iter_documents(source, text_field, allow_download, max_documents))
    if len(documents) < 2:
        raise ValueError(f"corpus source {source!r} yielded {len(documents)} documents; need at least 2")
    every = max(int(round(1.0 / heldout_fraction)), 2)
    splits = {"train": [d for i, d in enumerate(documents) if i % every != every - 1],
              "heldout": [d for i, d in enumerate(documents) if i % every == every - 1]}
    if not splits["heldout"]:
        splits["heldout"], splits["train"] = splits["train"][-1:], splits["train"][:-1]
    tokenizer = make_tokenizer(tokenizer_spec, splits["train"][:tokenizer_documents])
    eot = tokenizer.token_to_id(END_OF_TEXT)
    if eot is None:
        raise ValueError(f"tokenizer {tokenizer_spec!r} lacks the {END_OF_TEXT} token that separates documents")
    counts = {}
    for split, texts in splits.items():
        ids = [np.asarray(e.ids + [eot], dtype=np.int32) for e in tokenizer.encode_batch(texts)]
        counts[split] = _write_split(out_dir, split, ids)
    atomic_write_bytes(out_dir / "tokenizer.json", tokenizer.to_str().encode("utf-8"))
    write_json(out_dir / "meta.json", {"source": source, "tokenizer": tokenizer_spec,
                                       "vocab_size": tokenizer.get_vocab_size(), "tokens": counts,
                                       "documents": {k: len(v) for k, v in splits.items()}})
    log.info("corpus encoded out_dir=%s train_tokens=%d heldout_tokens=%d", out_dir, counts["train"], counts["heldout"])
    return out_dir


def load_corpus(folder: str | Path) -> tuple[TokenStream, TokenStream]:
    """Return (train, heldout) TokenStreams whose tokens are memory-mapped int32 files."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no encoded corpus (meta.json missing); run prepare_corpus first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    streams = []
    for split in ("train", "heldout"):
        # Copy-on-write mapping: torch wants a writable buffer, and nothing is ever written back.
        tokens = np.memmap(folder / f"{split}.tokens", dtype=np.int32, mode="c")
        starts = np.load(folder / f"{split}.starts.npy", allow_pickle=False)
        names = tuple(f"{split}_{i:06d}" for i in range(len(starts)))
        streams.append(TokenStream(torch.from_numpy(tokens), torch.from_numpy(starts), names, meta["vocab_size"]))
    return streams[0], streams[1]


def train_cached_on(folder: str | Path, model_config: ModelConfig, train_config: TrainConfig,
                    desc: str = "train") -> TrainResult:
    """Train on an encoded corpus folder, reusing a finished run from .cache/runs/ when one matches.

    The cache key covers both configs, the folder's meta.json (source, tokenizer, token counts)
    and the model and trainer source, like experiments.train_cached does for the shipped corpus.
    """
    folder = Path(folder)
    train_stream, heldout_stream = load_corpus(folder)
    data_key = f"{folder.resolve()}:{(folder / 'meta.json').read_text(encoding='utf-8')}"
    run_dir = CACHE_DIR / "runs" / run_key(model_config, train_config, data_key)
    return train(model_config, train_config, train_stream, heldout_stream, run_dir=run_dir, desc=desc)
