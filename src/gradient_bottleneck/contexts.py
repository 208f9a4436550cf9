"""Collect final hidden states and next-token targets of a TinyLM on held-out text."""

import math

import torch

from .model import TinyLM
from .tokenizer import TokenStream


@torch.no_grad()
def collect_contexts(model: TinyLM, stream: TokenStream, n_tokens: int, batch_size: int = 16,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Return H (C, D) float32 after the final norm and targets (C,) for C = n_tokens positions.

    The positions come from ceil(n_tokens / T) windows of T = context_length tokens spread evenly
    over the stream, so every part of the held-out text contributes.
    """
    time = model.config.context_length
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= 1")
    n_windows = math.ceil(n_tokens / time)
    span = len(stream.tokens) - time - 1
    if span < n_windows:
        raise ValueError(f"stream of {len(stream.tokens)} tokens is too short for {n_windows} windows of {time}; "
                         f"lower n_tokens={n_tokens}")
    starts = torch.linspace(0, span, n_windows).long().tolist()
    windows = torch.stack([stream.tokens[s:s + time + 1] for s in starts])
    was_training = model.training
    model.eval()
    hidden, targets = [], []
    for batch in windows.split(batch_size):
        hidden.append(model.hidden_states(batch[:, :-1].to(device)).float().cpu().reshape(-1, model.config.width))
        targets.append(batch[:, 1:].reshape(-1))
    model.train(was_training)
    return torch.cat(hidden)[:n_tokens], torch.cat(targets)[:n_tokens]
