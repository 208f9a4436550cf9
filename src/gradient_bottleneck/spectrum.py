"""Spectrum of the logit gradient G (C, V): numerical rank, effective rank, energy shares.

Definitions used throughout the companion:
- numerical rank: the number of singular values above max(C, V) * eps(float32) * s_max, the
  numpy/torch `matrix_rank` convention for a matrix computed in float32;
- effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective
  dimensionality"): exp(H(p)) with p_i = s_i / sum_j s_j and H the Shannon entropy in nats;
- directions for a share q of the energy: the smallest k with
  sum_{i<=k} s_i^2 >= q * sum_i s_i^2.
"""

import math

import torch


def singular_values(grad: torch.Tensor) -> torch.Tensor:
    """Return the singular values of G (C, V) in float64, descending.

    When C <= V the C x C Gram matrix G G^T is diagonalised, so no V x V matrix is formed;
    otherwise `torch.linalg.svdvals` runs on G directly (it does not form V x V either).
    """
    if grad.dim() != 2 or 0 in grad.shape:
        raise ValueError(f"G must be a non-empty (C, V) matrix, got shape {tuple(grad.shape)}")
    grad = grad.to(torch.float64)
    if grad.shape[0] <= grad.shape[1]:
        eigenvalues = torch.linalg.eigvalsh(grad @ grad.T)
        return eigenvalues.clamp_min(0.0).sqrt().flip(0)
    return torch.linalg.svdvals(grad)


def numerical_rank(values: torch.Tensor, shape: tuple[int, int], eps: float | None = None) -> int:
    """Count singular values above max(shape) * eps * s_max (eps defaults to float32's)."""
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    if values.numel() == 0 or float(values.max()) == 0.0:
        return 0
    return int((values > max(shape) * eps * values.max()).sum())


def effective_rank(values: torch.Tensor) -> float:
    """Return the entropy effective rank exp(H(s / sum s)) of Roy & Vetterli (2007)."""
    total = float(values.sum())
    if total == 0.0:
        return 0.0
    p = values[values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def directions_for_energy(values: torch.Tensor, share: float) -> int:
    """Return the smallest k whose top-k singular directions hold `share` of sum s_i^2."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"energy share {share} must lie in (0, 1]")
    energy = values.to(torch.float64).pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # The first index whose cumulative share reaches `share`; the small tolerance lets share=1.0
    # be reached despite rounding in the cumulative sum.
    index = int(torch.searchsorted(cumulative, torch.tensor(share - 1e-12, dtype=torch.float64)))
    return min(index, len(values) - 1) + 1


def cumulative_energy(values: torch.Tensor) -> torch.Tensor:
    energy = values.to(torch.float64).pow(2)
    return torch.cumsum(energy, 0) / energy.sum()


def eckart_young_cosine_bound(values: torch.Tensor, rank: int) -> float:
    """Return the largest cos(G, X) over matrices X of rank <= `rank`: sqrt(sum_{i<=rank} s_i^2) / ||G||_F."""
    energy = values.to(torch.float64).pow(2)
    total = float(energy.sum())
    if total == 0.0:
        raise ValueError("G is zero, so its cosine with any matrix is undefined")
    return math.sqrt(float(energy[:rank].sum()) / total)


def spectrum_summary(grad: torch.Tensor, shares: tuple[float, ...] = (0.7, 0.99, 0.999)) -> dict:
    values = singular_values(grad)
    return {
        "shape": list(grad.shape),
        "numerical_rank": numerical_rank(values, tuple(grad.shape)),
        "effective_rank": effective_rank(values),
        "directions_for_energy": {str(q): directions_for_energy(values, q) for q in shares},
    }
