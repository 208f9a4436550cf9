"""The chunked cross-entropy against autograd through F.cross_entropy on the full logits."""

import pytest
import torch
import torch.nn.functional as F

from gradient_bottleneck.chunked_loss import chunked_cross_entropy, default_chunk_size
from gradient_bottleneck.model import ModelConfig, TinyLM


def reference(hidden, weight, targets):
    """Return (loss, dloss/dH, dloss/dW) by autograd through the full (C, V) logits."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    loss = F.cross_entropy(logits, targets.reshape(-1))
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def chunked(hidden, weight, targets, chunk_size=None, scale=1.0):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def random_head(contexts, width, vocab_size, dtype=torch.float64, seed=0, logit_scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(contexts, width, generator=generator, dtype=dtype) * logit_scale
    weight = torch.randn(vocab_size, width, generator=generator, dtype=dtype) / width ** 0.5
    targets = torch.randint(0, vocab_size, (contexts,), generator=generator)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 100, None])
def test_loss_and_gradients_match_autograd(chunk_size):
    hidden, weight, targets = random_head(37, 12, 90)
    loss, grad_hidden, grad_weight = chunked(hidden, weight, targets, chunk_size)
    ref_loss, ref_hidden, ref_weight = reference(hidden, weight, targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-10, atol=1e-12)


def test_float32_matches_autograd_to_rounding():
    hidden, weight, targets = random_head(300, 32, 2048, dtype=torch.float32)
    loss, grad_hidden, grad_weight = chunked(hidden, weight, targets, chunk_size=64)
    ref_loss, ref_hidden, ref_weight = reference(hidden, weight, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-4, atol=1e-8)
    assert grad_hidden.dtype == torch.float32
    assert grad_weight.dtype == torch.float32


def test_batched_hidden_states_keep_their_shape():
    hidden, weight, targets = random_head(24, 8, 30)
    hidden, targets = hidden.reshape(4, 6, 8), targets.reshape(4, 6)
    loss, grad_hidden, grad_weight = chunked(hidden, weight, targets, chunk_size=5)
    ref_loss, ref_hidden, ref_weight = reference(hidden, weight, targets)
    assert grad_hidden.shape == (4, 6, 8)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_hidden.reshape(4, 6, 8))
    torch.testing.assert_close(grad_weight, ref_weight)


def test_losses_beyond_float32_softmax_range_stay_finite():
    # Logits of a few hundred make p_y underflow to 0 in float32 for most rows, so -log p_y would be inf.
    hidden, weight, targets = random_head(40, 16, 64, dtype=torch.float32, logit_scale=400.0)
    loss, grad_hidden, grad_weight = chunked(hidden, weight, targets, chunk_size=16)
    ref_loss, ref_hidden, ref_weight = reference(hidden, weight, targets)
    assert ref_loss > 200  # the case the fallback exists for
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-4, atol=1e-6)


def test_incoming_gradient_scales_both_gradients():
    hidden, weight, targets = random_head(20, 6, 40)
    _, grad_hidden, grad_weight = chunked(hidden, weight, targets, chunk_size=8, scale=-2.5)
    _, ref_hidden, ref_weight = reference(hidden, weight, targets)
    torch.testing.assert_close(grad_hidden, -2.5 * ref_hidden)
    torch.testing.assert_close(grad_weight, -2.5 * ref_weight)


def test_frozen_head_gets_no_gradient():
    hidden, weight, targets = random_head(20, 6, 40)
    hidden.requires_grad_()
    chunked_cross_entropy(hidden, weight, targets, 8).backward()
    _, ref_hidden, _ = reference(hidden, weight, targets)
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, ref_hidden)


def test_bfloat16_autocast_is_close_to_float32():
    hidden, weight, targets = random_head(64, 32, 256, dtype=torch.float32)
    ref_loss, ref_hidden, ref_weight = reference(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad_hidden, grad_weight = chunked(hidden, weight, targets, chunk_size=16)
    assert loss.dtype == torch.float32
    assert grad_weight.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=5e-2, atol=5e-3)


def test_default_chunk_size_bounds_the_buffer():
    assert default_chunk_size(8192) == 256
    assert default_chunk_size(2048) == 1024
    assert default_chunk_size(10 ** 8) == 1  # a vocabulary larger than the budget still gets one row


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, w, y: (h[:, :5], w, y), r"width 5 do not match the head's D=6"),
        (lambda h, w, y: (h, w, y[:-1]), r"targets of shape \(19,\) must match"),
        (lambda h, w, y: (h, w, y.clone().fill_(40)), r"target ids must lie in \[0, V=40\), got ids from 40 to 40"),
        (lambda h, w, y: (h, w, y - 100), r"must lie in \[0, V=40\)"),
        (lambda h, w, y: (h, w[0], y), r"\(V, D\) matrix, got shape \(6,\)"),
        (lambda h, w, y: (h[:0], w, y[:0]), "zero contexts"),
    ],
)
def test_rejects_bad_inputs(change, message):
    hidden, weight, targets = change(*random_head(20, 6, 40))
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(hidden, weight, targets)


def test_rejects_float_targets():
    hidden, weight, targets = random_head(20, 6, 40)
    with pytest.raises(TypeError, match="integer token ids, got dtype torch.float32"):
        chunked_cross_entropy(hidden, weight, targets.float())


@pytest.mark.parametrize("chunk_size", [0, -3, True, 2.0])
def test_rejects_bad_chunk_size(chunk_size):
    hidden, weight, targets = random_head(20, 6, 40)
    with pytest.raises(ValueError, match=f"chunk_size={chunk_size!r} must be a positive number"):
        chunked_cross_entropy(hidden, weight, targets, chunk_size)


@pytest.mark.parametrize(("head", "rank"), [("full", None), ("tied", None), ("factorised", 3), ("backward_only", 3)])
def test_model_loss_paths_agree(head, rank):
    """TinyLM's chunked loss (the trainer's path) and its logits path give the same loss and gradients."""
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(vocab_size=50, context_length=12, width=16, n_layers=2, n_heads=2,
                               head=head, head_rank=rank)).double()
    idx = torch.randint(0, 50, (3, 13))
    inputs, targets = idx[:, :-1], idx[:, 1:]

    logits, loss = model(inputs, targets)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    no_logits, chunked_loss = model(inputs, targets, return_logits=False)
    chunked_loss.backward()

    assert logits.shape == (3, 12, 50)
    assert no_logits is None
    assert chunked_loss.dtype == torch.float64
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-12, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_model_without_targets_rejects_loss_only_call():
    model = TinyLM(ModelConfig(vocab_size=50, context_length=12, width=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(torch.randint(0, 50, (2, 12)), return_logits=False)


def test_compiled_model_trains_through_chunked_loss():
    # backend="eager" traces with dynamo but skips inductor's C++ build, which takes ~30 s on CPU.
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(vocab_size=64, context_length=8, width=16, n_layers=1, n_heads=2))
    compiled = torch.compile(model, backend="eager")
    idx = torch.randint(0, 64, (2, 9))
    _, loss = compiled(idx[:, :-1], idx[:, 1:], return_logits=False)
    loss.backward()
    _, expected = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss.detach(), expected.detach())
    assert model.head.weight.grad is not None
