"""Compare training runs that differ only in the LM head.

- tokens-to-matched-loss: how many training tokens a run needs to reach a target held-out loss,
  read off its evaluation curve, and the ratio the paper reports as "16x";
- accuracy on frequent versus rare tokens, with buckets defined by training-split frequency;
- held-out loss per corpus document.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tokenizer import TokenStream


def tokens_to_matched_loss(tokens: list[float], losses: list[float], target: float) -> float | None:
    """Return the tokens at which the curve (tokens, losses) first reaches `target`, or None.

    The curve is the held-out loss at each evaluation, tokens increasing. Between the last
    evaluation above `target` and the first at or below it, the loss is taken as linear in tokens,
    so the crossing is tokens_a + (loss_a - target) / (loss_a - loss_b) * (tokens_b - tokens_a).
    If the first evaluation is already at or below `target`, its token count is returned: the
    crossing happened no later, so the result is an upper bound (and any ratio built on it a
    lower bound). None means the curve never reaches `target`.
    """
    if len(tokens) != len(losses) or not tokens:
        raise ValueError(f"tokens ({len(tokens)}) and losses ({len(losses)}) must be non-empty and of equal length")
    if any(b <= a for a, b in zip(tokens, tokens[1:])):
        raise ValueError("tokens must increase strictly along the curve; sort the evaluations by step")
    if losses[0] <= target:
        return float(tokens[0])
    for (t_a, l_a), (t_b, l_b) in zip(zip(tokens, losses), zip(tokens[1:], losses[1:])):
        if l_b <= target:
            return float(t_a + (l_a - target) / (l_a - l_b) * (t_b - t_a))
    return None


def matched_loss_ratio(reference_tokens: list[float], reference_losses: list[float],
                       run_tokens: float, run_final_loss: float) -> float | None:
    """Tokens a run trained on, divided by the tokens the reference run needs to reach that run's
    final held-out loss. With the full head as reference and the narrowest head as the run this is
    the paper's tokens-to-matched-loss ratio (11B / 700M ~ 16x). None when the reference never
    reaches the run's final loss (the run ended lower than the reference ever got)."""
    matched = tokens_to_matched_loss(reference_tokens, reference_losses, run_final_loss)
    return None if matched is None else run_tokens / matched


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


BUCKETS = ("frequent", "middle", "rare")


def frequency_buckets(train_tokens: torch.Tensor, vocab_size: int, frequent_mass: float = 0.5,
                      rare_mass: float = 0.1) -> torch.Tensor:
    """Assign each token id to a frequency bucket (0 frequent, 1 middle, 2 rare) by its training count.

    The vocabulary is sorted from most to least frequent. "Frequent" is the shortest head of that
    list covering `frequent_mass` of all training tokens. "Rare" is the tail covering the last
    `rare_mass` of them, plus every token that never occurs in training.
    """
    if not 0.0 < frequent_mass < 1.0 - rare_mass < 1.0:
        raise ValueError(f"need 0 < frequent_mass={frequent_mass} < 1 - rare_mass={1 - rare_mass} < 1")
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double()
    order = torch.argsort(counts, descending=True, stable=True)
    share_before = (torch.cumsum(counts[order], 0) - counts[order]) / counts.sum()  # mass of more frequent ids
    bucket_sorted = torch.ones(vocab_size, dtype=torch.long)
    bucket_sorted[share_before < frequent_mass] = 0
    bucket_sorted[share_before >= 1.0 - rare_mass] = 2
    buckets = torch.empty(vocab_size, dtype=torch.long)
    buckets[order] = bucket_sorted
    buckets[counts == 0] = 2
    return buckets


@dataclass
class TokenMetrics:
    """Per-target-position results of one model on a held-out stream (N scored positions)."""

    losses: torch.Tensor  # (N,) cross-entropy in nats
    correct: torch.Tensor  # (N,) bool, argmax == target
    targets: torch.Tensor  # (N,) target token ids
    positions: torch.Tensor  # (N,) stream offsets of the targets


@torch.no_grad()
def heldout_token_metrics(model, stream: TokenStream, context_length: int, batch_size: int = 16,
                          device: str | torch.device = "cpu", max_windows: int | None = None) -> TokenMetrics:
    """Score the targets of non-overlapping windows of T + 1 tokens tiling the held-out stream.

    Each window predicts its last T tokens (the stream's first token is never a target). With
    max_windows set, that many windows are taken evenly spaced over the stream, so every document
    keeps a share proportional to its length.
    """
    tokens = stream.tokens
    n_windows = (len(tokens) - 1) // context_length
    if n_windows < 1:
        raise ValueError(f"held-out stream of {len(tokens)} tokens is shorter than context_length={context_length} + 1")
    starts = torch.arange(n_windows) * context_length
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows={max_windows} must be >= 1 (or None for every window)")
        if max_windows < n_windows:
            starts = starts[torch.linspace(0, n_windows - 1, max_windows).round().long()]
    was_training = model.training
    model.eval()
    offsets = torch.arange(context_length + 1)
    losses, correct, targets, positions = [], [], [], []
    for chunk in starts.split(batch_size):
        index = chunk[:, None] + offsets[None, :]  # (B, T + 1)
        windows = tokens[index].long()
        inputs, target = windows[:, :-1].to(device), windows[:, 1:].to(device)
        logits, _ = model(inputs)
        losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                      reduction="none").cpu())
        correct.append((logits.argmax(-1) == target).reshape(-1).cpu())
        targets.append(target.reshape(-1).cpu())
        positions.append(index[:, 1:].reshape(-1))
    model.train(was_training)
    return TokenMetrics(torch.cat(losses), torch.cat(correct), torch.cat(targets), torch.cat(positions))


def bucket_accuracy(metrics: TokenMetrics, buckets: torch.Tensor) -> dict:
    """Next-token accuracy and mean loss per frequency bucket, with the number of targets in each."""
    bucket_of_target = buckets[metrics.targets]
    result = {}
    for index, name in enumerate(BUCKETS):
        mask = bucket_of_target == index
        count = int(mask.sum())
        result[name] = {
            "accuracy": float(metrics.correct[mask].double().mean()) if count else math.nan,
            "loss": float(metrics.losses[mask].double().mean()) if count else math.nan,
            "targets": count,
        }
    return result


def per_document_loss(metrics: TokenMetrics, stream: TokenStream) -> dict[str, float]:
    """Mean held-out loss (nats/token) of each document that has scored targets."""
    documents = stream.document_of(metrics.positions)
    sums = torch.zeros(len(stream.doc_names), dtype=torch.float64).index_add_(0, documents, metrics.losses.double())
    counts = torch.bincount(documents, minlength=len(stream.doc_names))
    return {name: float(sums[i] / counts[i]) for i, name in enumerate(stream.doc_names) if counts[i] > 0}
