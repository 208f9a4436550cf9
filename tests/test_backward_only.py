"""The backward-only head: full head forward, rank-r gradient to the backbone."""

import pytest
import torch
import torch.nn.functional as F

from gradient_bottleneck.model import BackwardRankProjection, ModelConfig, TinyLM, top_right_singular_vectors


def best_rank_approximation(weight, rank):
    """W_r = U_r S_r V_r^T from torch.linalg.svd, independent of the Gram-matrix route in the model."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_backward_equals_best_rank_head_gradient(generator, rank):
    vocab, width, contexts = 50, 8, 12
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
    hidden = torch.randn(contexts, width, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (contexts,), generator=generator)

    loss = F.cross_entropy(BackwardRankProjection.apply(hidden, weight, rank) @ weight.T, targets)
    (projected,) = torch.autograd.grad(loss, hidden)

    # Explicit: G = dL/dL_logits from the full head's logits, backbone receives G W_r.
    probs = torch.softmax(hidden.detach() @ weight.T, dim=-1)
    grad_logits = (probs - F.one_hot(targets, vocab).double()) / contexts
    expected = grad_logits @ best_rank_approximation(weight, rank)
    torch.testing.assert_close(projected, expected, rtol=1e-9, atol=1e-12)


def test_full_rank_passes_whole_gradient(generator):
    weight = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    hidden = torch.randn(5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad((hidden @ weight.T).sin().sum(), hidden)
    (through,) = torch.autograd.grad((BackwardRankProjection.apply(hidden, weight, 6) @ weight.T).sin().sum(), hidden)
    torch.testing.assert_close(through, plain)


def test_top_singular_vectors_match_svd(generator):
    weight = torch.randn(40, 10, generator=generator)
    basis = top_right_singular_vectors(weight, 4)
    _, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    torch.testing.assert_close(basis.double() @ basis.double().T, vh[:4].T @ vh[:4], atol=1e-5, rtol=0)


def test_backward_only_keeps_forward_and_head_gradient():
    config = dict(vocab_size=64, context_length=8, width=16, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    full = TinyLM(ModelConfig(**config, head="full"))
    torch.manual_seed(0)
    control = TinyLM(ModelConfig(**config, head="backward_only", head_rank=2))
    idx = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    (logits_full, loss_full), (logits_ctrl, loss_ctrl) = full(idx, idx), control(idx, idx)
    torch.testing.assert_close(logits_ctrl, logits_full)  # same parameters, same forward pass
    loss_full.backward()
    loss_ctrl.backward()
    # The head's own gradient G^T H is untouched; the backbone's gradient differs.
    torch.testing.assert_close(control.head.weight.grad, full.head.weight.grad)
    assert not torch.allclose(control.blocks[0].mlp[0].weight.grad, full.blocks[0].mlp[0].weight.grad)
    assert control.num_parameters() == full.num_parameters()


@pytest.mark.parametrize("rank", [None, 0, 17, 2.0])
def test_backward_only_rank_validated(rank):
    with pytest.raises(ValueError, match="head rank r=.*backward_only"):
        ModelConfig(vocab_size=64, width=16, head="backward_only", head_rank=rank)
