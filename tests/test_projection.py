import math

import pytest
import torch

from gradient_bottleneck.gradients import logit_gradient
from gradient_bottleneck.projection import (
    HeadProjector,
    equal_norm_loss_decrease,
    measure_projection,
    random_baseline,
)


def lstsq_visible_norms(grad, weight):
    """||g Q Q^T|| per row by least squares: the projection of g^T onto col(W) is W x*, x* = argmin ||W x - g^T||."""
    solution = torch.linalg.lstsq(weight, grad.T, driver="gelsd").solution
    return (weight @ solution).norm(dim=0)


def svd_basis(weight, rank):
    u, _, _ = torch.linalg.svd(weight, full_matrices=False)
    return u[:, :rank]


def test_visible_norms_match_lstsq(generator):
    weight = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    grad = torch.randn(25, 300, generator=generator, dtype=torch.float64)
    projector = HeadProjector(weight, compute_dtype=torch.float64)
    coords = projector.visible_coordinates(grad)
    torch.testing.assert_close(coords.norm(dim=-1), lstsq_visible_norms(grad, weight), rtol=1e-10, atol=0)
    assert projector.rank == 16


def test_rank_deficient_head_matches_svd_projection(generator):
    # W = A B of rank 5 with D = 12: the projector must find rank 5 and project onto those 5 directions.
    weight = torch.randn(200, 5, generator=generator, dtype=torch.float64) @ torch.randn(5, 12, generator=generator,
                                                                                        dtype=torch.float64)
    grad = torch.randn(10, 200, generator=generator, dtype=torch.float64)
    projector = HeadProjector(weight, compute_dtype=torch.float64)
    basis = svd_basis(weight, 5)
    assert projector.rank == 5
    torch.testing.assert_close(projector.project(grad), grad @ basis @ basis.T, rtol=1e-8, atol=1e-10)


def test_float32_head_agrees_with_float64_reference(generator):
    weight = torch.randn(2000, 32, generator=generator)
    grad = logit_gradient(torch.randn(64, 2000, generator=generator), torch.randint(0, 2000, (64,), generator=generator))
    fast = HeadProjector(weight).visible_coordinates(grad).norm(dim=-1).double()
    exact = lstsq_visible_norms(grad.double(), weight.double())
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=0)


def test_bfloat16_head_is_cast_in_row_blocks(generator):
    weight = torch.randn(1000, 8, generator=generator).to(torch.bfloat16)
    grad = torch.randn(4, 1000, generator=generator)
    blocked = HeadProjector(weight, row_chunk=96).visible_coordinates(grad)
    reference = HeadProjector(weight.float())
    torch.testing.assert_close(blocked, reference.visible_coordinates(grad), rtol=1e-4, atol=1e-6)


def test_ratio_and_cosine_are_complementary(generator):
    hidden = torch.randn(70, 10, generator=generator)
    weight = torch.randn(500, 10, generator=generator)
    targets = torch.randint(0, 500, (70,), generator=generator)
    stats = measure_projection(hidden, weight, targets, chunk_size=16)
    assert stats.num_tokens == 70
    assert math.isclose(stats.destroyed_ratio**2 + stats.visible_cosine**2, 1.0, rel_tol=1e-12)
    per_token = stats.token_destroyed().double() ** 2 + stats.token_cosine().double() ** 2
    torch.testing.assert_close(per_token, torch.ones(70, dtype=torch.float64), rtol=1e-6, atol=0)


def test_frobenius_aggregate_matches_direct_formula(generator):
    hidden = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(80, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 80, (50,), generator=generator)
    grad = logit_gradient(hidden @ weight.T, targets)
    basis = svd_basis(weight, 6)
    expected = (grad - grad @ basis @ basis.T).norm() / grad.norm()
    stats = measure_projection(hidden, weight, targets, chunk_size=7,
                               projector=HeadProjector(weight, compute_dtype=torch.float64))
    assert math.isclose(stats.destroyed_ratio, float(expected), rel_tol=1e-10)


def test_random_directions_match_baseline(generator):
    # For isotropic random g, E[c^2] = D / V; with 4000 rows the mean is within a few percent.
    vocab, width = 400, 40
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
    grad = torch.randn(4000, vocab, generator=generator, dtype=torch.float64)
    coords = HeadProjector(weight, compute_dtype=torch.float64).visible_coordinates(grad)
    mean_cos_sq = float((coords.pow(2).sum(-1) / grad.pow(2).sum(-1)).mean())
    assert abs(mean_cos_sq - width / vocab) < 0.05 * width / vocab
    assert random_baseline(width, vocab) == pytest.approx(math.sqrt(1 - width / vocab))


def test_projector_rejects_bad_heads():
    with pytest.raises(ValueError, match="NaN or Inf"):
        HeadProjector(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="zero"):
        HeadProjector(torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"\(V, D\)"):
        HeadProjector(torch.zeros(5))
    with pytest.raises(ValueError, match="V=1"):
        HeadProjector(torch.ones(1, 3))
    with pytest.raises(ValueError, match="300 entries, the head has V=4"):
        HeadProjector(torch.ones(4, 3)).visible_coordinates(torch.zeros(2, 300))


def test_measure_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="D=3"):
        measure_projection(torch.zeros(4, 2), torch.ones(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="C=0"):
        measure_projection(torch.zeros(0, 3), torch.randn(5, 3), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(("width", "vocab"), [(0, 10), (5, 1), (11, 10)])
def test_random_baseline_rejects_bad_sizes(width, vocab):
    with pytest.raises(ValueError):
        random_baseline(width, vocab)


def test_equal_norm_decrease_first_order(generator):
    hidden = torch.randn(64, 8, generator=generator)
    weight = torch.randn(300, 8, generator=generator) * 0.3
    targets = torch.randint(0, 300, (64,), generator=generator)
    eta = 1e-3
    result = equal_norm_loss_decrease(hidden, weight, targets, [eta], chunk_size=20)
    # To first order the loss drops by eta * <G, u> for a unit direction u:
    # eta * ||G|| along -G and eta * ||G|| * cos(G, G W W^T) along the induced step.
    assert result["decrease_along_gradient"][0] == pytest.approx(eta * result["gradient_norm"], rel=1e-2)
    expected_induced = eta * result["gradient_norm"] * result["cosine_gradient_induced"]
    assert result["decrease_along_induced"][0] == pytest.approx(expected_induced, rel=1e-2)
    assert result["decrease_along_gradient"][0] > result["decrease_along_induced"][0] > 0
    with pytest.raises(ValueError, match="step sizes"):
        equal_norm_loss_decrease(hidden, weight, targets, [-1.0])


def test_float32_factorised_head_keeps_its_rank(generator):
    # A (V, r) @ B (r, D) computed in float32 is full rank only through rounding noise, which the
    # default tolerance must drop.
    up = torch.randn(8192, 7, generator=generator) * 0.1
    down = torch.randn(7, 256, generator=generator) * 0.1
    assert HeadProjector(up @ down).rank == 7
