"""Shared steps of the notebooks: load the encoded corpus and train (or reload) a model."""

import logging

from .corpus import corpus_hash
from .model import ModelConfig
from .paths import CACHE_DIR
from .tokenizer import TokenStream, encode_split
from .train import TrainConfig, TrainResult, run_key, train

log = logging.getLogger(__name__)


def load_streams(vocab_size: int) -> tuple[TokenStream, TokenStream]:
    """Return the (train, held-out) token streams of the shipped corpus for a V-token BPE."""
    return encode_split("train", vocab_size), encode_split("heldout", vocab_size)


def train_cached(model_config: ModelConfig, train_config: TrainConfig, desc: str = "train") -> TrainResult:
    """Train on the shipped corpus, reusing a finished run from .cache/runs/ when one matches.

    The cache key covers both configs, the corpus hash and the source of model.py, chunked_loss.py
    and train.py, so two notebooks asking for the same run share it and any code change retrains.
    """
    streams = load_streams(model_config.vocab_size)
    data_key = f"{corpus_hash()[:16]}-V{model_config.vocab_size}"
    run_dir = CACHE_DIR / "runs" / run_key(model_config, train_config, data_key)
    result = train(model_config, train_config, *streams, run_dir=run_dir, desc=desc)
    log.info("run ready run_dir=%s resumed_from_step=%d", run_dir, result.resumed_from_step)
    return result
