"""How much of the logit gradient survives the transposed LM head.

The backbone receives dLoss/dH = G W. A logit-gradient row g (1, V) therefore reaches the
backbone only through its projection g Q Q^T onto col(W), where Q (V, k) is an orthonormal
basis of the head's column space and k = rank(W) <= D. The rest lies in ker(W^T) and is lost:

    destroyed ratio  r = ||G - G Q Q^T||_F / ||G||_F
    visible cosine   c = cos(G, G Q Q^T) = ||G Q Q^T||_F / ||G||_F,   with r^2 + c^2 = 1.

Q is never formed. With the eigendecomposition W^T W = U diag(s^2) U^T (D, D) we have
Q = W U_k diag(1/s_k), so the visible coordinates of g are  g Q = (g W) U_k diag(1/s_k):
one (C, V) x (V, D) product, the same cost as the head's own forward pass, and no V x V or
V x k matrix. Directions whose singular value is below a tolerance count as outside col(W),
which handles rank-deficient heads (e.g. a factorised head W = A B of rank r < D).
"""

import math
from dataclasses import dataclass, field

import torch

from .gradients import iter_logit_gradient_chunks, logit_gradient


def random_baseline(hidden_size: int, vocab_size: int) -> float:
    """Return sqrt(1 - D/V), the destroyed ratio expected for a direction random w.r.t. col(W).

    For a uniformly random unit vector in R^V the squared norm of its projection onto a
    D-dimensional subspace has expectation D/V.
    """
    if hidden_size < 1 or vocab_size < 2:
        raise ValueError(f"need D >= 1 and V >= 2, got D={hidden_size}, V={vocab_size}")
    if hidden_size > vocab_size:
        raise ValueError(f"D={hidden_size} exceeds V={vocab_size}; the head then loses nothing")
    return math.sqrt(1.0 - hidden_size / vocab_size)


GRAM_RTOL_FLOOR = 1e-5


class HeadProjector:
    """Projection onto col(W) for a head W (V, D), built from the D x D Gram matrix in float64.

    rtol: singular values s_i <= rtol * s_max are treated as zero. The default, 1e-5, sits above
    the rounding noise of the float64 Gram matrix, whose eigenvalues carry absolute errors near
    D * eps(float64) * s_max^2, i.e. singular values near 1e-6 * s_max for D = 4096. The stored
    head's own dtype sets no floor: the model computes its logits with exactly these weights, so
    even a bfloat16 head's small directions are real. Pass a larger rtol to treat a head as the
    rounded copy of a lower-rank matrix.
    """

    def __init__(self, head_weight: torch.Tensor, rtol: float | None = None,
                 compute_dtype: torch.dtype = torch.float32, row_chunk: int = 8192):
        if head_weight.dim() != 2:
            raise ValueError(f"head weight must be (V, D), got shape {tuple(head_weight.shape)}")
        vocab_size, hidden_size = head_weight.shape
        if vocab_size < 2 or hidden_size < 1:
            raise ValueError(f"head weight of shape (V={vocab_size}, D={hidden_size}) needs V >= 2 and D >= 1")
        self.weight = head_weight.detach()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.compute_dtype = compute_dtype
        self.row_chunk = row_chunk

        # W^T W accumulated in float64 over row chunks, so a large head is never copied whole.
        gram = torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=head_weight.device)
        for start in range(0, vocab_size, row_chunk):
            block = self.weight[start:start + row_chunk].to(torch.float64)
            gram += block.T @ block
        # A NaN or Inf anywhere in W reaches the diagonal of W^T W; checking there avoids a
        # temporary boolean copy of the whole head.
        if not torch.isfinite(gram.diagonal()).all():
            raise ValueError("head weight contains NaN or Inf; check the checkpoint it came from")
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        singular_values = eigenvalues.clamp_min(0.0).sqrt()
        self.rtol = GRAM_RTOL_FLOOR if rtol is None else rtol
        s_max = singular_values.max()
        keep = singular_values > self.rtol * s_max if s_max > 0 else torch.zeros_like(singular_values, dtype=torch.bool)
        self.rank = int(keep.sum())
        if self.rank == 0:
            raise ValueError("head weight is zero; it has no column space to project onto")
        self.singular_values = singular_values.flip(0)  # descending, including the dropped ones
        # whitening R (D, k): Q = W R is orthonormal because R^T W^T W R = I.
        self.whitening = (eigenvectors[:, keep] / singular_values[keep]).to(compute_dtype)

    def visible_coordinates(self, grad: torch.Tensor) -> torch.Tensor:
        """Return g Q (C, k) for logit-gradient rows g (C, V); their norms equal ||g Q Q^T||."""
        if grad.shape[-1] != self.vocab_size:
            raise ValueError(f"gradient rows have {grad.shape[-1]} entries, the head has V={self.vocab_size}")
        grad = grad.to(self.compute_dtype)
        if self.weight.dtype == self.compute_dtype:
            grad_w = grad @ self.weight
        else:
            # Cast the head one row block at a time to bound memory for half-precision heads.
            grad_w = torch.zeros(grad.shape[0], self.hidden_size, dtype=self.compute_dtype, device=grad.device)
            for start in range(0, self.vocab_size, self.row_chunk):
                stop = start + self.row_chunk
                grad_w += grad[:, start:stop] @ self.weight[start:stop].to(self.compute_dtype)
        return grad_w @ self.whitening

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """Return g Q Q^T (C, V). Forms a (C, V) matrix; use for small C only."""
        coords = self.visible_coordinates(grad)
        return (coords @ self.whitening.T) @ self.weight.to(self.compute_dtype).T


def _squared_row_norms(matrix: torch.Tensor, block_rows: int = 64) -> torch.Tensor:
    """Return ||row||^2 accumulated in float64, converting 64 rows at a time to bound memory."""
    return torch.cat([torch.linalg.vector_norm(block, dim=-1, dtype=torch.float64).square()
                      for block in matrix.split(block_rows)])


@dataclass
class ProjectionStats:
    """Destroyed ratio and visible cosine, aggregated over tokens and per token."""

    total_sq: float = 0.0  # sum_t ||g_t||^2
    visible_sq: float = 0.0  # sum_t ||g_t Q||^2
    per_token_destroyed: list[torch.Tensor] = field(default_factory=list)
    per_token_cosine: list[torch.Tensor] = field(default_factory=list)
    head_rank: int | None = None

    def update(self, grad: torch.Tensor, coords: torch.Tensor) -> None:
        row_sq = _squared_row_norms(grad)
        visible_row_sq = _squared_row_norms(coords)
        # Rounding can push ||gQ||^2 a hair above ||g||^2; clamp so ratios stay in [0, 1].
        visible_row_sq = torch.minimum(visible_row_sq, row_sq)
        self.total_sq += float(row_sq.sum())
        self.visible_sq += float(visible_row_sq.sum())
        cosine = torch.where(row_sq > 0, (visible_row_sq / row_sq.clamp_min(1e-300)).sqrt(), torch.zeros_like(row_sq))
        self.per_token_cosine.append(cosine.float().cpu())
        self.per_token_destroyed.append((1.0 - cosine.pow(2)).clamp_min(0.0).sqrt().float().cpu())

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.per_token_cosine)

    @property
    def visible_cosine(self) -> float:
        """Frobenius aggregate ||G Q Q^T||_F / ||G||_F over all tokens."""
        if self.total_sq == 0:
            raise ValueError("no tokens with a non-zero gradient were measured")
        return math.sqrt(self.visible_sq / self.total_sq)

    @property
    def destroyed_ratio(self) -> float:
        """Frobenius aggregate ||G - G Q Q^T||_F / ||G||_F over all tokens."""
        return math.sqrt(max(0.0, 1.0 - self.visible_cosine**2))

    def token_destroyed(self) -> torch.Tensor:
        return torch.cat(self.per_token_destroyed) if self.per_token_destroyed else torch.empty(0)

    def token_cosine(self) -> torch.Tensor:
        return torch.cat(self.per_token_cosine) if self.per_token_cosine else torch.empty(0)

    def summary(self) -> dict:
        per_token = self.token_destroyed()
        return {
            "destroyed_ratio": self.destroyed_ratio,
            "visible_cosine": self.visible_cosine,
            "destroyed_ratio_token_mean": float(per_token.mean()),
            "destroyed_ratio_token_median": float(per_token.median()),
            "destroyed_ratio_token_p05": float(per_token.quantile(0.05)),
            "destroyed_ratio_token_p95": float(per_token.quantile(0.95)),
            "tokens": self.num_tokens,
            "head_rank": self.head_rank,
        }


def measure_projection(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    projector: HeadProjector | None = None,
) -> ProjectionStats:
    """Measure destroyed ratio and visible cosine of the logit gradient, streamed over tokens.

    hidden: (C, D) final hidden states after the final norm; head_weight: (V, D);
    targets: (C,) next-token ids. Memory is O(chunk_size * V) plus the head.
    """
    if hidden.dim() != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(f"hidden states {tuple(hidden.shape)} must be (C, D) with D={head_weight.shape[1]}")
    if hidden.shape[0] == 0:
        raise ValueError("no tokens to measure (C=0); provide at least one context")
    projector = projector or HeadProjector(head_weight)
    stats = ProjectionStats(head_rank=projector.rank)
    with torch.no_grad():
        for _, grad in iter_logit_gradient_chunks(hidden, head_weight, targets, chunk_size, head_bias):
            stats.update(grad, projector.visible_coordinates(grad))
    return stats


def equal_norm_loss_decrease(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    step_sizes: list[float],
    chunk_size: int = 1024,
) -> dict:
    """Compare two logit updates of equal Frobenius norm eta: along -G and along -G W W^T.

    -G is the steepest-descent direction in logit space; -G W W^T is the logit change caused by
    a gradient step on the hidden states alone (dH = -G W, dL = dH W^T). Both directions are
    normalised over the whole batch, so each step moves the (C, V) logits by exactly eta.
    Returns the mean cross-entropy decrease for each eta, for both directions.
    """
    if any(eta < 0 for eta in step_sizes):
        raise ValueError(f"step sizes must be >= 0, got {step_sizes}")
    num_contexts = hidden.shape[0]
    # float64 because the decreases are small differences between losses of order 1-10.
    hidden = hidden.double()
    weight = head_weight.double()
    uniform = torch.full((num_contexts,), 1.0 / num_contexts, dtype=torch.float64)

    def directions(rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the logits, G and G W W^T of one chunk, all at the starting point."""
        logits = hidden[rows] @ weight.T
        grad = logit_gradient(logits, targets[rows], uniform[rows])
        return logits, grad, (grad @ weight) @ weight.T

    chunk_rows = [slice(s, min(s + chunk_size, num_contexts)) for s in range(0, num_contexts, chunk_size)]

    # Pass 1: the global norms that scale both directions to length eta.
    grad_sq = induced_sq = inner = 0.0
    for rows in chunk_rows:
        _, grad, induced = directions(rows)
        grad_sq += float(grad.pow(2).sum())
        induced_sq += float(induced.pow(2).sum())
        inner += float((grad * induced).sum())
    grad_norm, induced_norm = math.sqrt(grad_sq), math.sqrt(induced_sq)
    if grad_norm == 0 or induced_norm == 0:
        raise ValueError("the logit gradient or its induced step is zero; the loss is already at its minimum")

    # Pass 2: mean cross-entropy after each step, recomputing the directions per chunk.
    base = 0.0
    after_full = [0.0] * len(step_sizes)
    after_induced = [0.0] * len(step_sizes)
    for rows in chunk_rows:
        logits, grad, induced = directions(rows)
        chunk_targets = targets[rows]
        base += float(torch.nn.functional.cross_entropy(logits, chunk_targets, reduction="sum"))
        for i, eta in enumerate(step_sizes):
            full_step = logits - eta * grad / grad_norm
            induced_step = logits - eta * induced / induced_norm
            after_full[i] += float(torch.nn.functional.cross_entropy(full_step, chunk_targets, reduction="sum"))
            after_induced[i] += float(torch.nn.functional.cross_entropy(induced_step, chunk_targets, reduction="sum"))
    base /= num_contexts
    return {
        "step_sizes": list(step_sizes),
        "loss": base,
        "decrease_along_gradient": [base - x / num_contexts for x in after_full],
        "decrease_along_induced": [base - x / num_contexts for x in after_induced],
        "gradient_norm": grad_norm,
        "induced_norm": induced_norm,
        # cos(G, G W W^T): the first-order efficiency of the induced step relative to -G.
        "cosine_gradient_induced": inner / (grad_norm * induced_norm),
    }
