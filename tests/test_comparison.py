"""Tokens-to-matched-loss, frequency buckets and per-document loss."""

import math

import pytest
import torch

from gradient_bottleneck.comparison import (
    bucket_accuracy,
    frequency_buckets,
    heldout_token_metrics,
    matched_loss_ratio,
    mean_std,
    per_document_loss,
    tokens_to_matched_loss,
)
from gradient_bottleneck.model import ModelConfig, TinyLM
from gradient_bottleneck.tokenizer import TokenStream


def test_crossing_interpolates_linearly():
    tokens, losses = [100, 200, 300, 400], [5.0, 4.0, 3.0, 2.5]
    assert tokens_to_matched_loss(tokens, losses, 3.5) == pytest.approx(250.0)
    assert tokens_to_matched_loss(tokens, losses, 3.0) == pytest.approx(300.0)
    assert tokens_to_matched_loss(tokens, losses, 2.75) == pytest.approx(350.0)


def test_crossing_edge_cases():
    tokens, losses = [100, 200, 300], [5.0, 4.0, 4.5]
    assert tokens_to_matched_loss(tokens, losses, 6.0) == 100.0  # already below at the first evaluation
    assert tokens_to_matched_loss(tokens, losses, 3.0) is None  # never reached
    assert tokens_to_matched_loss(tokens, losses, 4.0) == pytest.approx(200.0)  # first crossing, not the last
    with pytest.raises(ValueError, match="increase strictly"):
        tokens_to_matched_loss([100, 100], [5.0, 4.0], 4.5)
    with pytest.raises(ValueError, match="equal length"):
        tokens_to_matched_loss([100], [5.0, 4.0], 4.5)


def test_matched_loss_ratio_sixteen_x_example():
    # Reference reaches 3.0 at 700 tokens (linear between 600 and 800); the narrow run ends at 3.0 after 11,200.
    reference_tokens, reference_losses = [200, 400, 600, 800], [4.0, 3.5, 3.2, 2.8]
    assert matched_loss_ratio(reference_tokens, reference_losses, 11_200, 3.0) == pytest.approx(16.0)
    assert matched_loss_ratio(reference_tokens, reference_losses, 11_200, 2.0) is None


def test_mean_std_skips_missing_values():
    mean, std = mean_std([1.0, 2.0, 3.0, None, math.nan])
    assert mean == pytest.approx(2.0)
    assert std == pytest.approx(1.0)  # sample deviation (ddof=1)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([None]))


def test_frequency_buckets_by_cumulative_mass():
    # Counts: id0 50, id1 30, id2 10, id3 6, id4 4, id5 0 -> shares before: 0, .5, .8, .9, .96
    train = torch.tensor([0] * 50 + [1] * 30 + [2] * 10 + [3] * 6 + [4] * 4)
    buckets = frequency_buckets(train, vocab_size=6, frequent_mass=0.5, rare_mass=0.1)
    assert buckets.tolist() == [0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="frequent_mass"):
        frequency_buckets(train, 6, frequent_mass=0.95, rare_mass=0.1)


def test_heldout_metrics_match_direct_forward():
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(vocab_size=40, context_length=8, width=16, n_layers=1, n_heads=2))
    tokens = torch.randint(0, 40, (50,), generator=torch.Generator().manual_seed(3))
    stream = TokenStream(tokens, torch.tensor([0, 20]), ("a", "b"), 40)
    metrics = heldout_token_metrics(model, stream, context_length=8, batch_size=4)
    assert len(metrics.losses) == 6 * 8  # (50 - 1) // 8 windows of 8 targets
    assert metrics.positions.tolist() == list(range(1, 49))
    logits, _ = model(tokens[8:16][None])
    direct = torch.nn.functional.cross_entropy(logits[0], tokens[9:17], reduction="none")
    torch.testing.assert_close(metrics.losses[8:16], direct)

    per_doc = per_document_loss(metrics, stream)
    assert per_doc["a"] == pytest.approx(float(metrics.losses[:19].double().mean()))  # targets at 1..19
    assert per_doc["b"] == pytest.approx(float(metrics.losses[19:].double().mean()))
    sampled = heldout_token_metrics(model, stream, context_length=8, batch_size=4, max_windows=2)
    assert sampled.positions.tolist() == list(range(1, 9)) + list(range(41, 49))  # first and last window
    torch.testing.assert_close(sampled.losses[8:], metrics.losses[40:])

    buckets = torch.zeros(40, dtype=torch.long)
    buckets[metrics.targets[0]] = 2
    result = bucket_accuracy(metrics, buckets)
    assert result["frequent"]["targets"] + result["rare"]["targets"] == 48
    assert result["middle"]["targets"] == 0
    assert math.isnan(result["middle"]["accuracy"])
    rare = buckets[metrics.targets] == 2
    assert result["rare"]["accuracy"] == pytest.approx(float(metrics.correct[rare].double().mean()))
