import pytest
import torch
import torch.nn.functional as F

from gradient_bottleneck.gradients import iter_logit_gradient_chunks, logit_gradient


def autograd_logit_gradient(logits, targets, weights=None):
    logits = logits.clone().requires_grad_(True)
    if targets.dim() == 1:
        per_context = F.cross_entropy(logits, targets, reduction="none")
    else:
        per_context = -(targets * logits.log_softmax(-1)).sum(-1)
    weights = torch.full((logits.shape[0],), 1.0 / logits.shape[0], dtype=logits.dtype) if weights is None else weights
    (per_context * weights).sum().backward()
    return logits.grad


def test_matches_autograd_class_targets(generator):
    logits = torch.randn(37, 50, generator=generator, dtype=torch.float64) * 3
    targets = torch.randint(0, 50, (37,), generator=generator)
    expected = autograd_logit_gradient(logits, targets)
    torch.testing.assert_close(logit_gradient(logits, targets), expected, rtol=0, atol=1e-14)


def test_matches_autograd_distribution_targets(generator):
    logits = torch.randn(20, 30, generator=generator, dtype=torch.float64)
    targets = torch.softmax(torch.randn(20, 30, generator=generator, dtype=torch.float64), -1)
    weights = torch.rand(20, generator=generator, dtype=torch.float64)
    expected = autograd_logit_gradient(logits, targets, weights)
    torch.testing.assert_close(logit_gradient(logits, targets, weights), expected, rtol=0, atol=1e-14)


def test_rows_sum_to_zero_and_rank_bound(generator):
    vocab = 12
    logits = torch.randn(40, vocab, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, vocab, (40,), generator=generator)
    grad = logit_gradient(logits, targets)
    assert grad.sum(-1).abs().max() < 1e-15
    assert torch.linalg.matrix_rank(grad) <= min(40, vocab - 1)


def test_half_precision_logits_use_float32_softmax(generator):
    logits = torch.randn(8, 16, generator=generator).to(torch.bfloat16)
    grad = logit_gradient(logits, torch.zeros(8, dtype=torch.long))
    assert grad.dtype == torch.float32


def test_chunks_stack_to_full_gradient(generator):
    hidden = torch.randn(45, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    bias = torch.randn(20, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 20, (45,), generator=generator)
    full = logit_gradient(hidden @ weight.T + bias, targets)
    pieces = [g for _, g in iter_logit_gradient_chunks(hidden, weight, targets, chunk_size=8, head_bias=bias)]
    torch.testing.assert_close(torch.cat(pieces), full)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (torch.tensor([0, 1, 5]), r"\[0, V=5\)"),
        (torch.tensor([0, 1]), "C=3"),
        (torch.tensor([0.0, 1.0, 2.0]), "int64"),
        (torch.zeros(3, 4), r"\(C, V\)=\(3, 5\)"),
        (torch.zeros(3, 5, 1), "shape"),
    ],
)
def test_bad_targets_raise(targets, message):
    with pytest.raises((ValueError, TypeError), match=message):
        logit_gradient(torch.zeros(3, 5), targets)


def test_bad_logits_and_chunk_size_raise():
    with pytest.raises(ValueError, match=r"\(C, V\)"):
        logit_gradient(torch.zeros(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size=0"):
        next(iter_logit_gradient_chunks(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), 0))
