import shutil

import pytest
import torch

from gradient_bottleneck.paths import CORPUS_DIR


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A corpus folder with three real training documents and one held-out document."""
    root = tmp_path_factory.mktemp("corpus")
    for split, names in {"train": ["shakespeare_hamlet", "shakespeare_tempest", "milton_areopagitica"],
                         "heldout": ["shakespeare_macbeth"]}.items():
        (root / split).mkdir()
        for name in names:
            shutil.copy(CORPUS_DIR / split / f"{name}.txt", root / split / f"{name}.txt")
    return root


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)
