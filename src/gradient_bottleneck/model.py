"""A small decoder-only Transformer whose LM head is full, tied or factorised.

Pre-norm GPT blocks (causal self-attention, GELU MLP), learned positions, a final LayerNorm,
then the LM head W (V, D) mapping hidden states H (B, T, D) to logits L = H W^T (B, T, V):
- "full":       W is its own parameter;
- "tied":       W is the token embedding matrix;
- "factorised": W = A B with A (V, r) and B (r, D), so rank(W) <= r (the paper's low-rank heads);
- "backward_only": W is a full head in the forward pass, but in the backward pass the gradient the
  backbone receives is restricted to a rank-r subspace of W (see BackwardRankProjection). This
  control keeps the forward pass's expressivity and narrows only the gradient path.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .chunked_loss import chunked_cross_entropy

HEAD_KINDS = ("full", "tied", "factorised", "backward_only")
RANKED_HEADS = ("factorised", "backward_only")  # head kinds that take head_rank r


@dataclass
class ModelConfig:
    vocab_size: int  # V
    context_length: int = 128  # T, the longest sequence the positional table covers
    width: int = 64  # D, also the input width of the LM head
    n_layers: int = 2
    n_heads: int = 4
    head: str = "full"  # one of HEAD_KINDS
    head_rank: int | None = None  # r for the factorised and backward_only heads; must be None otherwise
    mlp_ratio: int = 4
    dropout: float = 0.0  # 0 keeps short CPU runs deterministic and comparable

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.vocab_size) or self.vocab_size < 2:
            raise ValueError(f"vocabulary size V={self.vocab_size!r} must be an integer >= 2")
        if not is_int(self.width) or self.width < 1:
            raise ValueError(f"width D={self.width!r} must be an integer >= 1")
        if not is_int(self.context_length) or self.context_length < 1:
            raise ValueError(f"context_length T={self.context_length!r} must be an integer >= 1")
        if not is_int(self.n_layers) or self.n_layers < 0:
            raise ValueError(f"n_layers={self.n_layers!r} must be an integer >= 0")
        if not is_int(self.n_heads) or self.n_heads < 1 or self.width % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads!r} must be >= 1 and divide the width D={self.width}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.head!r}; use one of {HEAD_KINDS}")
        if self.head == "factorised":
            if not is_int(self.head_rank) or not 1 <= self.head_rank <= self.width:
                raise ValueError(
                    f"head rank r={self.head_rank!r} must be in [1, D={self.width}]; use r=D or head='full' for the full head"
                )
        elif self.head == "backward_only":
            if not is_int(self.head_rank) or not 1 <= self.head_rank <= self.width:
                raise ValueError(
                    f"head rank r={self.head_rank!r} must be in [1, D={self.width}] for head='backward_only'; "
                    "r=D passes the whole gradient, like head='full'"
                )
        elif self.head_rank is not None:
            raise ValueError(
                f"head_rank={self.head_rank} only applies to head='factorised' or head='backward_only', "
                f"not head={self.head!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.out = nn.Linear(config.width, config.width)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (B, T, D) -> (B, heads, T, D / heads)
        q, k, v = (t.view(batch, time, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, time, width))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, config.mlp_ratio * config.width),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * config.width, config.width),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FactorisedHead(nn.Module):
    """W = A B with A (V, r), B (r, D); logits = (H B^T) A^T costs O(r (V + D)) per token."""

    def __init__(self, vocab_size: int, width: int, rank: int):
        super().__init__()
        # Each factor gets std sqrt(0.02 / sqrt(r)), so entries of A B have std 0.02 like a full head.
        std = math.sqrt(0.02 / math.sqrt(rank))
        self.down = nn.Parameter(torch.randn(rank, width) * std)  # B
        self.up = nn.Parameter(torch.randn(vocab_size, rank) * std)  # A

    def weight(self) -> torch.Tensor:
        return self.up @ self.down

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.down.T) @ self.up.T


def top_right_singular_vectors(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Return V_r (D, r): the right singular vectors of W (V, D) with the r largest singular values.

    They are the top eigenvectors of the D x D Gram matrix W^T W, computed in float64 so that
    nearly equal singular values still give an orthonormal basis; this never forms a V x V matrix.
    """
    gram = weight.detach().double().T @ weight.detach().double()
    _, eigenvectors = torch.linalg.eigh(gram)  # eigenvalues in ascending order
    return eigenvectors[:, -rank:].flip(-1).to(weight.dtype)


class BackwardRankProjection(torch.autograd.Function):
    """Identity on the hidden states H in the forward pass; in the backward pass the incoming
    gradient dL/dH = G W (C, D) is projected onto the span of V_r, the top-r right singular
    vectors of the head W (recomputed from the current W at every backward pass):

        backbone receives  G W V_r V_r^T = G W_r,  W_r = U_r S_r V_r^T the best rank-r approximation of W.

    So the backbone sees exactly the hidden-state gradient a head of rank r (W_r) would send, while
    the logits, the loss and the head's own gradient G^T H still use the full W.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, rank: int) -> torch.Tensor:
        ctx.save_for_backward(weight.detach())
        ctx.rank = rank
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (weight,) = ctx.saved_tensors
        if ctx.rank >= weight.shape[1]:
            return grad_hidden, None, None  # r = D keeps the whole row space: nothing to remove
        basis = top_right_singular_vectors(weight, ctx.rank).to(grad_hidden.dtype)  # V_r (D, r)
        return (grad_hidden @ basis) @ basis.T, None, None


class TinyLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Embedding(config.context_length, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.width)
        self.head = None
        if config.head in ("full", "backward_only"):
            self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        elif config.head == "factorised":
            self.head = FactorisedHead(config.vocab_size, config.width, config.head_rank)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, param in self.named_parameters():
            if name.startswith("head.") and self.config.head == "factorised":
                continue  # initialised by FactorisedHead
            if param.dim() >= 2:
                nn.init.normal_(param, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
        # GPT-2's scaling of residual projections by 1/sqrt(2 * layers) keeps the residual stream's
        # variance from growing with depth.
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * max(self.config.n_layers, 1)))

    def num_parameters(self) -> int:
        """Count trainable parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def head_weight(self) -> torch.Tensor:
        """Return the effective head W (V, D) used in the forward pass."""
        if self.config.head == "tied":
            return self.embed.weight
        if self.config.head == "factorised":
            return self.head.weight()
        return self.head.weight

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the final hidden states H (B, T, D), taken after the final LayerNorm."""
        time = idx.shape[1]
        if time > self.config.context_length:
            raise ValueError(f"sequence length {time} exceeds context_length={self.config.context_length}")
        x = self.embed(idx) + self.pos(torch.arange(time, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def head_operands(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (X, M) with logits = X M^T: the last matrix product of the head and its input.

        full and tied: (H, W). factorised: (H B^T, A), so the chunked loss never forms W = A B.
        backward_only: (H, W) with H routed through BackwardRankProjection.
        """
        if self.config.head == "tied":
            return hidden, self.embed.weight
        if self.config.head == "factorised":
            return hidden @ self.head.down.T, self.head.up
        if self.config.head == "backward_only":
            hidden = BackwardRankProjection.apply(hidden, self.head.weight, self.config.head_rank)
        return hidden, self.head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        inputs, weight = self.head_operands(hidden)
        return F.linear(inputs, weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True):
        """Return (logits (B, T, V) or None, mean cross-entropy or None).

        With targets and return_logits=False, the loss comes from chunked_cross_entropy, which never
        stores the (B, T, V) logits and computes the head's gradients as it goes. The trainer calls
        it this way because it needs only the loss. The loss and gradients equal the logits path's
        to float rounding.
        """
        hidden = self.hidden_states(idx)
        if not return_logits:
            if targets is None:
                raise ValueError("return_logits=False needs targets, because the model then returns only the loss")
            return None, chunked_cross_entropy(*self.head_operands(hidden), targets)
        logits = self.logits(hidden)
        loss = None
        if targets is not None:
            # at least float32, so half-precision logits do not lose the loss; float64 stays float64
            flat = logits.reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), targets.reshape(-1))
        return logits, loss
