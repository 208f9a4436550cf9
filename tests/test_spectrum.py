import math

import pytest
import torch

from gradient_bottleneck.spectrum import (
    directions_for_energy,
    eckart_young_cosine_bound,
    effective_rank,
    numerical_rank,
    singular_values,
    spectrum_summary,
)


@pytest.mark.parametrize("shape", [(20, 50), (50, 20)])
def test_singular_values_match_svdvals(generator, shape):
    matrix = torch.randn(*shape, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(singular_values(matrix), torch.linalg.svdvals(matrix), rtol=1e-9, atol=1e-9)


def test_numerical_rank_of_low_rank_product(generator):
    matrix = torch.randn(30, 4, generator=generator) @ torch.randn(4, 60, generator=generator)
    values = singular_values(matrix)
    assert numerical_rank(values, (30, 60)) == 4 == int(torch.linalg.matrix_rank(matrix))
    assert numerical_rank(torch.zeros(3), (3, 3)) == 0


def test_effective_rank_extremes():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_directions_for_energy():
    values = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64).sqrt()  # energies 3, 2, 1 of total 6
    assert directions_for_energy(values, 0.5) == 1
    assert directions_for_energy(values, 0.51) == 2
    assert directions_for_energy(values, 5 / 6) == 2
    assert directions_for_energy(values, 1.0) == 3
    with pytest.raises(ValueError, match="share 0"):
        directions_for_energy(values, 0.0)


def test_eckart_young_bound_is_attained_by_truncated_svd(generator):
    matrix = torch.randn(15, 40, generator=generator, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = 4
    best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    cosine = float((matrix * best).sum() / (matrix.norm() * best.norm()))
    assert eckart_young_cosine_bound(s, k) == pytest.approx(cosine, rel=1e-12)
    other = torch.randn(15, k, generator=generator, dtype=torch.float64) @ torch.randn(k, 40, generator=generator,
                                                                                      dtype=torch.float64)
    other_cosine = float((matrix * other).sum() / (matrix.norm() * other.norm()))
    assert other_cosine <= eckart_young_cosine_bound(s, k)


def test_summary_and_bad_input(generator):
    summary = spectrum_summary(torch.randn(10, 30, generator=generator))
    assert summary["numerical_rank"] == 10
    assert set(summary["directions_for_energy"]) == {"0.7", "0.99", "0.999"}
    with pytest.raises(ValueError, match="non-empty"):
        singular_values(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="zero"):
        eckart_young_cosine_bound(torch.zeros(3), 1)
    assert math.isfinite(effective_rank(singular_values(torch.randn(5, 5, generator=generator))))
