"""The shipped English corpus: Shakespeare's and Milton's works from Project Gutenberg.

data/corpus/{train,heldout}/ contains one UTF-8 text file per document; data/README.md gives the
source, licence and checksums. The split is by document, so held-out text is never trained on.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .paths import CORPUS_DIR

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    name: str  # file stem, e.g. "shakespeare_hamlet"
    text: str


def _split_dir(split: str, corpus_dir: Path) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; use one of {SPLITS}")
    folder = Path(corpus_dir) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"corpus folder {folder} is missing; restore data/corpus from git "
            "or rebuild it with data/prepare_corpus.py"
        )
    return folder


def document_paths(split: str, corpus_dir: Path = CORPUS_DIR) -> list[Path]:
    """Return the sorted text files of one split, raising if there are none."""
    paths = sorted(_split_dir(split, corpus_dir).glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no .txt documents in {Path(corpus_dir) / split}; the corpus is empty")
    return paths


def load_documents(split: str, corpus_dir: Path = CORPUS_DIR) -> list[Document]:
    """Read every document of a split; empty files are rejected because they hide a broken copy."""
    documents = []
    for path in document_paths(split, corpus_dir):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus document {path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                             "convert it to UTF-8") from exc
        if not text.strip():
            raise ValueError(f"corpus document {path} is empty; restore it from git")
        documents.append(Document(path.stem, text))
    return documents


def corpus_hash(corpus_dir: Path = CORPUS_DIR) -> str:
    """Return a SHA-256 over every split's file names and bytes; it keys the tokenizer cache."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for path in document_paths(split, corpus_dir):
            digest.update(f"{split}/{path.name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
