"""Repository paths, resolved from this file so notebooks and tests work from any folder."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"
CORPUS_DIR = DATA_DIR / "corpus"
PROFILES_DIR = REPO_ROOT / "profiles"
RESULTS_DIR = REPO_ROOT / "results"
# Tokenizers, encoded corpora and checkpoints are derived data: git-ignored and rebuilt on demand.
CACHE_DIR = Path(os.environ.get("GRADIENT_BOTTLENECK_CACHE", REPO_ROOT / ".cache"))


def resolve(path: str | os.PathLike) -> Path:
    """Return `path` as an absolute path, interpreting relative paths from the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path
