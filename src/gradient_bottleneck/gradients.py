"""The logit gradient G = dLoss/dLogits = diag(f) (P - N~) and its streamed computation.

For a loss  Loss = sum_c f_c * CE(softmax(L_c), y_c)  over contexts c = 1..C, the gradient with
respect to the logits L (C, V) is  G = diag(f) (P - N~), with P = softmax(L) row-wise and N~ the
targets as one-hot rows (or empirical next-token distributions). Every row of P - N~ sums to
zero, so rank(G) <= min(C, V - 1). The backbone receives dLoss/dH = G W and the head receives
dLoss/dW = G^T H (Godey & Artzi 2026, arXiv:2603.10145, section on the gradient bottleneck).
"""

from collections.abc import Iterator

import torch


def _check_targets(targets: torch.Tensor, num_contexts: int, vocab_size: int) -> None:
    if targets.dim() == 1:
        if targets.shape[0] != num_contexts:
            raise ValueError(f"targets have {targets.shape[0]} entries but logits have C={num_contexts} rows")
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"class-index targets must be int64 or int32, got {targets.dtype}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= vocab_size):
            raise ValueError(
                f"target ids must lie in [0, V={vocab_size}); got min={int(targets.min())}, max={int(targets.max())}"
            )
    elif targets.dim() == 2:
        if targets.shape != (num_contexts, vocab_size):
            raise ValueError(f"target distributions of shape {tuple(targets.shape)} must be (C, V)=({num_contexts}, {vocab_size})")
    else:
        raise ValueError(f"targets must be (C,) class ids or (C, V) distributions, got shape {tuple(targets.shape)}")


def logit_gradient(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Return G = diag(f) (softmax(logits) - N~) for logits (C, V).

    targets: (C,) class ids or (C, V) target distributions (rows summing to 1).
    weights: (C,) per-context weights f; None means f = 1/C, the gradient of the mean loss.
    The softmax is taken in float32 or wider, whatever the logits' dtype.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (C, V), got shape {tuple(logits.shape)}")
    num_contexts, vocab_size = logits.shape
    _check_targets(targets, num_contexts, vocab_size)
    work_dtype = torch.promote_types(logits.dtype, torch.float32)
    grad = torch.softmax(logits.to(work_dtype), dim=-1)
    if targets.dim() == 1:
        grad[torch.arange(num_contexts, device=logits.device), targets.long()] -= 1.0
    else:
        grad -= targets.to(work_dtype)
    if weights is None:
        grad /= max(num_contexts, 1)
    else:
        if weights.shape != (num_contexts,):
            raise ValueError(f"weights must have shape (C,)=({num_contexts},), got {tuple(weights.shape)}")
        grad *= weights.to(work_dtype)[:, None]
    return grad


def iter_logit_gradient_chunks(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    head_bias: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows, G[rows]) for consecutive chunks of contexts, never holding all of G.

    hidden: (C, D) final hidden states after the final norm; head_weight: (V, D).
    weights: (C,) per-context weights; None means 1/C for every context, as for the full batch
    (not 1/chunk), so the chunks stack to exactly the G of the whole batch.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    num_contexts = hidden.shape[0]
    if weights is None:
        weights = torch.full((num_contexts,), 1.0 / max(num_contexts, 1), dtype=torch.float64, device=hidden.device)
    for start in range(0, num_contexts, chunk_size):
        rows = slice(start, min(start + chunk_size, num_contexts))
        logits = hidden[rows] @ head_weight.T
        if head_bias is not None:
            logits = logits + head_bias
        yield rows, logit_gradient(logits, targets[rows], weights[rows])
