"""Mean cross-entropy of the LM head's logits, computed in chunks of contexts without storing (C, V).

For hidden states H (C, D), a head W (V, D) and targets y (C,), the loss is

    loss = (1 / C) sum_c [ logsumexp(L_c) - L_c[y_c] ],   L = H W^T (C, V),

and its logit gradient is G = (softmax(L) - onehot(y)) / C, so dloss/dH = G W and dloss/dW = G^T H.
The autograd graph of `F.cross_entropy(H @ W.T, y)` keeps the full (C, V) logits and builds three
more (C, V) tensors in the backward pass (log-softmax, its gradient, the one-hot scatter). Here
each chunk of contexts computes its logits and their softmax, turns the softmax into C G in place,
and adds its share of both gradients right away. So only one or two (chunk, V) buffers exist at a
time. The backward pass only scales the stored gradients by the incoming scalar over C. The values equal autograd's to float rounding.
"""

import torch

# Elements of one (chunk, V) logits buffer. 2^21 float32 values are 8 MiB, which is large enough
# for each chunk's three matrix products to run at full speed and small enough for a server CPU's
# L3 cache. `python -m gradient_bottleneck.bench --only training` measures the effect on a step.
CHUNK_ELEMENTS = 1 << 21


def default_chunk_size(vocab_size: int) -> int:
    """Return the number of contexts per chunk for a logits buffer of about CHUNK_ELEMENTS values."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of H W^T, with both gradients computed in the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        contexts = hidden.shape[0]
        device_type = hidden.device.type
        # Under autocast the products run in the autocast dtype, as F.linear would. The softmax, the
        # loss and the head's gradient accumulate in float32, or in float64 for float64 inputs.
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        accumulate_dtype = torch.promote_types(compute_dtype, torch.float32)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # NOTE: softmax with out= its own input is checked on CPU only (tests); other devices keep
        # the out-of-place softmax.
        in_place_softmax = device_type == "cpu"

        with torch.autocast(device_type, enabled=False), torch.no_grad():
            head = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if want_weight else None
            loss_sum = torch.zeros((), dtype=accumulate_dtype, device=hidden.device)
            for start in range(0, contexts, chunk_size):
                h = hidden[start:start + chunk_size].to(compute_dtype)  # (chunk, D)
                y = targets[start:start + chunk_size]
                rows = torch.arange(y.shape[0], device=y.device)
                logits = (h @ head.T).to(accumulate_dtype)  # (chunk, V)
                # One fused softmax pass serves both the loss, -log p_y, and the gradient, p - onehot.
                # On CPU it overwrites the logits, which saves a (chunk, V) buffer and its page faults.
                if in_place_softmax:
                    probs = torch.softmax(logits, dim=-1, out=logits)
                else:
                    probs = torch.softmax(logits, dim=-1)
                losses = -torch.log(probs[rows, y])
                # In float32, p_y underflows to 0 once a loss passes about 87 nats. Those rows are
                # recomputed as logsumexp - logit, which has no such limit.
                overflow = torch.isinf(losses)
                if overflow.any():
                    bad = overflow.nonzero().squeeze(1)
                    bad_logits = (h[bad] @ head.T).to(accumulate_dtype)
                    losses[bad] = torch.logsumexp(bad_logits, dim=-1) - bad_logits[torch.arange(bad.shape[0]), y[bad]]
                loss_sum += losses.sum()

                # probs becomes C G = softmax - onehot in place, and backward applies the 1 / C.
                probs[rows, y] -= 1.0
                grad_logits = probs.to(compute_dtype)
                if want_hidden:
                    grad_hidden[start:start + chunk_size] = grad_logits @ head
                if want_weight:
                    grad_weight += grad_logits.T @ h

        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.contexts = contexts
        return loss_sum / contexts

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors  # both C times the mean loss's gradients
        scale = grad_loss / ctx.contexts
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


# torch.compile runs this function eagerly and compiles the backbone around it, because the target
# range check needs host values and the chunk loop would otherwise break the graph with a warning.
@torch.compiler.disable
def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int | None = None) -> torch.Tensor:
    """Return the mean cross-entropy of the logits H W^T against the targets, never storing (C, V).

    hidden (..., D) and targets (...) are flattened to C contexts; weight is the head W (V, D).
    chunk_size is the number of contexts per chunk (default: about 2^21 logits per chunk).
    """
    if weight.dim() != 2:
        raise ValueError(f"head weight must be a (V, D) matrix, got shape {tuple(weight.shape)}")
    vocab_size, width = weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden states of width {hidden.shape[-1]} do not match the head's D={width}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} must match the hidden states' leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if targets.numel() == 0:
        raise ValueError("cross-entropy of zero contexts is undefined; pass at least one target")
    lowest, highest = int(targets.min()), int(targets.max())
    if lowest < 0 or highest >= vocab_size:
        raise ValueError(f"target ids must lie in [0, V={vocab_size}), got ids from {lowest} to {highest}")
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of contexts")
    flat_hidden = hidden.reshape(-1, width)
    flat_targets = targets.reshape(-1).long()
    return ChunkedCrossEntropy.apply(flat_hidden, weight, flat_targets, chunk_size)
