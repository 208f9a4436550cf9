"""SpamLang, a synthetic language whose only rule is "the next token equals the current one".

Godey & Artzi (2026, arXiv:2603.10145, the SpamLang experiment) train small LMs on sequences that
repeat one symbol drawn uniformly from V symbols, and report that at a fixed token budget the task
becomes unlearnable as V/D grows. A repeated-symbol sequence of T positions is a single independent
draw, so at large V each symbol is drawn only a few times. The coverage-controlled variant spends
the same supervised-token budget on independent draws, one fresh symbol per supervised position,
which separates "too few draws per symbol" from "too narrow a head".

Both variants use the same (input, target) form: at every supervised position the target is the
input symbol itself. For the repeated variant an example is T + 1 copies of one symbol, read as T
inputs and the T next tokens. For the coverage variant with T = 1 an example is the two-token
sequence "s s"; with T > 1 every position gets a fresh symbol and is supervised with a copy of it.

This module also holds the width-2 construction (symbols on the unit circle, head rows as scaled
copies), which shows the rule is expressible at any width D >= 2, and a one-pass training loop for
such sequence datasets built on TinyLM.
"""

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import ModelConfig, TinyLM
from .train import TrainConfig, learning_rate, progress_disabled, select_device

log = logging.getLogger(__name__)

VARIANTS = ("repeated", "coverage")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpamLangData:
    """A SpamLang dataset stored as its independent draws.

    symbols has shape (N, 1) for the repeated variant (one symbol per sequence) and (N, T) for the
    coverage variant (one symbol per supervised position).
    """

    symbols: torch.Tensor  # (N, 1) or (N, T) int64 symbol ids in [0, V)
    seq_len: int  # T, supervised positions per sequence
    vocab_size: int  # V
    variant: str  # one of VARIANTS

    @property
    def num_sequences(self) -> int:
        return self.symbols.shape[0]

    @property
    def supervised_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    @property
    def independent_draws(self) -> int:
        return self.symbols.numel()

    def sequences(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return inputs and targets, both (b, T), for the sequences at `index`; targets equal inputs."""
        rows = self.symbols[index]
        inputs = rows.expand(-1, self.seq_len).contiguous() if self.variant == "repeated" else rows
        return inputs, inputs

    def draw_counts(self) -> torch.Tensor:
        """Return how many independent draws each symbol received, shape (V,)."""
        return torch.bincount(self.symbols.reshape(-1), minlength=self.vocab_size)

    def coverage(self) -> dict:
        """Return the budget accounting: draws and supervised tokens per symbol, and the never-seen share."""
        counts = self.draw_counts()
        tokens_per_draw = self.seq_len if self.variant == "repeated" else 1
        return {
            "variant": self.variant,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "num_sequences": self.num_sequences,
            "supervised_tokens": self.supervised_tokens,
            "independent_draws": self.independent_draws,
            "draws_per_symbol": self.independent_draws / self.vocab_size,
            "supervised_tokens_per_symbol": self.supervised_tokens / self.vocab_size,
            "tokens_per_draw": tokens_per_draw,
            "min_draws": int(counts.min()),
            "median_draws": float(counts.double().median()),
            "never_seen_share": float((counts == 0).double().mean()),
        }


def generate(variant: str, vocab_size: int, budget_tokens: int, seq_len: int, seed: int) -> SpamLangData:
    """Draw a SpamLang dataset of floor(budget_tokens / seq_len) sequences of seq_len supervised positions.

    The supervised-token count is budget_tokens rounded down to a multiple of seq_len. The same seed
    gives the same symbols on every machine because torch's CPU generator draws them.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SpamLang variant {variant!r}; use one of {VARIANTS}")
    if not _is_int(vocab_size) or vocab_size < 2:
        raise ValueError(f"vocabulary size V={vocab_size!r} must be an integer >= 2")
    if not _is_int(seq_len) or seq_len < 1:
        raise ValueError(f"sequence length T={seq_len!r} must be an integer >= 1")
    if not _is_int(budget_tokens) or budget_tokens < seq_len:
        raise ValueError(
            f"budget_tokens={budget_tokens!r} must be an integer >= the sequence length T={seq_len}, "
            "so that at least one sequence fits"
        )
    if not _is_int(seed):
        raise ValueError(f"seed={seed!r} must be an integer")
    num_sequences = budget_tokens // seq_len
    width = 1 if variant == "repeated" else seq_len
    generator = torch.Generator().manual_seed(seed)
    symbols = torch.randint(0, vocab_size, (num_sequences, width), generator=generator)
    return SpamLangData(symbols=symbols, seq_len=seq_len, vocab_size=vocab_size, variant=variant)


# --------------------------------------------------------------------------------------------
# The width-2 construction
# --------------------------------------------------------------------------------------------


def circle_points(vocab_size: int) -> torch.Tensor:
    """Return V points on the unit circle at angles 2 pi s / V, shape (V, 2), in float64."""
    if not _is_int(vocab_size) or vocab_size < 2:
        raise ValueError(f"vocabulary size V={vocab_size!r} must be an integer >= 2")
    angles = 2 * math.pi * torch.arange(vocab_size, dtype=torch.float64) / vocab_size
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def circle_scale(vocab_size: int, margin: float = 20.0) -> float:
    """Return the head scale alpha at which the correct logit beats the nearest wrong one by `margin` nats.

    With unit embeddings e_s and head rows alpha e_s, the logit of symbol s' for input s is
    alpha cos(theta_s - theta_s'), so the smallest gap is alpha (1 - cos(2 pi / V)).
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin={margin!r} must be a positive number of nats, e.g. 20")
    return margin / (1.0 - math.cos(2 * math.pi / vocab_size))


@torch.no_grad()
def circle_accuracy(vocab_size: int, margin: float = 20.0, queries: int | None = None, chunk: int = 256,
                    seed: int = 0) -> dict:
    """Score the width-2 construction: accuracy and mean cross-entropy of predicting s from s.

    queries=None scores every symbol; an integer scores that many symbols drawn without replacement
    (seeded), each against all V head rows. Logits are built `chunk` queries at a time in float64,
    because at V = 131072 neighbouring logits differ by about 1e-9 relative, below float32 precision.
    """
    points = circle_points(vocab_size)
    head = circle_scale(vocab_size, margin) * points  # (V, 2): scaled copies of the embeddings
    if queries is None:
        query_ids = torch.arange(vocab_size)
    else:
        if not _is_int(queries) or not 1 <= queries <= vocab_size:
            raise ValueError(f"queries={queries!r} must be None or an integer in [1, V={vocab_size}]")
        query_ids = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:queries]
    if not _is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be an integer >= 1")
    correct, loss_sum, min_gap = 0, 0.0, math.inf
    for ids in query_ids.split(chunk):
        logits = points[ids] @ head.T  # (chunk, V)
        correct += int((logits.argmax(dim=1) == ids).sum())
        loss_sum += float(F.cross_entropy(logits, ids, reduction="sum"))
        target = logits.gather(1, ids[:, None])
        logits.scatter_(1, ids[:, None], -math.inf)
        min_gap = min(min_gap, float((target[:, 0] - logits.max(dim=1).values).min()))
    count = len(query_ids)
    return {"vocab_size": vocab_size, "width": 2, "queries": count, "accuracy": correct / count,
            "loss": loss_sum / count, "min_logit_gap": min_gap}


@torch.no_grad()
def circle_tinylm(config: ModelConfig, margin: float = 20.0) -> TinyLM:
    """Build a float64 TinyLM of the given config whose weights implement the width-2 construction.

    The blocks are made the identity by zeroing their residual output projections, and positional
    embeddings are zero. The final LayerNorm would collapse a 2-d circle, so each symbol's embedding
    is (cos, sin, -cos, -sin, 0, ...): it has zero mean and constant norm, which LayerNorm only
    rescales. This needs D >= 4 and works for full and tied heads.
    """
    if config.width < 4:
        raise ValueError(f"circle_tinylm needs width D >= 4 to survive the final LayerNorm, got D={config.width}; "
                         "use circle_accuracy for the bare width-2 construction")
    if config.head == "factorised":
        raise ValueError("circle_tinylm supports head='full' or 'tied'; a factorised head needs its own factors")
    model = TinyLM(config).double().eval()
    for block in model.blocks:
        for projection in (block.attn.out, block.mlp[2]):
            projection.weight.zero_()
            projection.bias.zero_()
    model.pos.weight.zero_()
    model.final_norm.weight.fill_(1.0)
    model.final_norm.bias.zero_()

    points = circle_points(config.vocab_size)
    pattern = torch.zeros(config.vocab_size, config.width, dtype=torch.float64)
    pattern[:, :2] = points
    pattern[:, 2:4] = -points
    # After LayerNorm the hidden state is pattern / sqrt(2 / D + eps), and pattern_s . pattern_s' =
    # 2 cos(theta_s - theta_s'), so the head scale below puts the nearest wrong logit `margin` nats back.
    normed = 1.0 / math.sqrt(2.0 / config.width + model.final_norm.eps)
    scale = circle_scale(config.vocab_size, margin) / (2.0 * normed)
    if config.head == "tied":
        # LayerNorm removes the embedding's scale, so the tied matrix can carry the head's scale.
        model.embed.weight.copy_(scale * pattern)
    else:
        model.embed.weight.copy_(pattern)
        model.head.weight.copy_(scale * pattern)
    return model


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class SequenceRun:
    """One training run on a sequence dataset."""

    model: TinyLM
    lr: float
    history: list[dict]  # per logging window: step, tokens_seen, lr, train_loss, train_accuracy
    final: dict  # heldout_loss, heldout_accuracy, end_train_loss, end_train_accuracy, diverged
    wall_time_s: float
    model_config: dict = field(default_factory=dict)


def steps_for_budget(data: SpamLangData, batch_size: int) -> int:
    """Return the optimizer steps of one pass over `data` in batches of `batch_size` sequences."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    steps = data.num_sequences // batch_size
    if steps < 1:
        raise ValueError(
            f"the dataset has {data.num_sequences} sequences, fewer than batch_size={batch_size}; "
            "raise the token budget or lower the batch size"
        )
    return steps


@torch.no_grad()
def evaluate_sequences(model: TinyLM, data: SpamLangData, batch_size: int = 256,
                       device: torch.device | str = "cpu") -> dict:
    """Return mean cross-entropy (nats per supervised token) and accuracy over every sequence of `data`.

    Cross-entropy is computed in the model's dtype, so a float64 model is scored in float64.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for index in torch.arange(data.num_sequences).split(batch_size):
        inputs, targets = (t.to(device) for t in data.sequences(index))
        logits = model.logits(model.hidden_states(inputs)).reshape(-1, data.vocab_size)
        flat_targets = targets.reshape(-1)
        loss_sum += float(F.cross_entropy(logits, flat_targets, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == flat_targets).sum())
        count += flat_targets.numel()
    model.train(was_training)
    return {"heldout_loss": loss_sum / count, "heldout_accuracy": correct / count}


def train_sequences(model_config: ModelConfig, train_config: TrainConfig, data: SpamLangData,
                    heldout: SpamLangData, desc: str = "spamlang") -> SequenceRun:
    """Train a TinyLM from scratch for train_config.steps batches, each sequence used at most once.

    Seeds follow train.train: torch.manual_seed(seed) fixes the initialisation, a torch.Generator
    seeded with the same value fixes the batch order. Training accuracy is measured on each batch
    before its update, so it scores draws the model has not been trained on yet in this pass.
    A non-finite loss stops the run and marks it diverged instead of raising, so a learning-rate
    sweep can continue past it.
    """
    # Phase 1: check the inputs against each other.
    if data.vocab_size != model_config.vocab_size or heldout.vocab_size != model_config.vocab_size:
        raise ValueError(f"data has V={data.vocab_size} and held-out data V={heldout.vocab_size}, "
                         f"but the model has V={model_config.vocab_size}; build them with the same V")
    if data.seq_len > model_config.context_length:
        raise ValueError(f"sequence length T={data.seq_len} exceeds context_length={model_config.context_length}; "
                         "set context_length >= T")
    available = steps_for_budget(data, train_config.batch_size)
    if train_config.steps > available:
        raise ValueError(f"steps={train_config.steps} with batch_size={train_config.batch_size} needs more than the "
                         f"{data.num_sequences} sequences in the dataset; use steps <= {available}")

    # Phase 2: set-up, seeded like train.train.
    device = select_device(train_config.device)
    torch.manual_seed(train_config.seed)
    model = TinyLM(model_config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_config.lr, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(train_config.seed)
    order = torch.randperm(data.num_sequences, generator=generator)
    tokens_per_step = train_config.batch_size * data.seq_len
    history: list[dict] = []
    started = time.perf_counter()

    # Phase 3: one pass over the shuffled sequences.
    model.train()
    window_loss, window_correct, window_steps = 0.0, 0, 0
    diverged = False
    bar = tqdm(range(train_config.steps), desc=desc, disable=progress_disabled(), leave=False)
    for step in bar:
        lr = learning_rate(step, train_config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = order[step * train_config.batch_size:(step + 1) * train_config.batch_size]
        inputs, targets = (t.to(device) for t in data.sequences(index))
        logits, loss = model(inputs, targets)
        if not torch.isfinite(loss):
            diverged = True
            log.warning("diverged step=%d lr=%.3g loss=%s desc=%s", step, lr, float(loss), desc)
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        window_loss += loss.item()
        window_correct += int((logits.detach().argmax(-1) == targets).sum())
        window_steps += 1

        done = step + 1
        if done % train_config.eval_every == 0 or done == train_config.steps:
            history.append({"step": done, "tokens_seen": done * tokens_per_step, "lr": lr,
                            "train_loss": window_loss / window_steps,
                            "train_accuracy": window_correct / (window_steps * tokens_per_step)})
            window_loss, window_correct, window_steps = 0.0, 0, 0

    # Phase 4: final held-out evaluation on fresh draws.
    if diverged:
        final = {"heldout_loss": math.inf, "heldout_accuracy": 0.0, "diverged": True}
    else:
        final = {**evaluate_sequences(model, heldout, device=device), "diverged": False}
    final["end_train_loss"] = history[-1]["train_loss"] if history else math.inf
    final["end_train_accuracy"] = history[-1]["train_accuracy"] if history else 0.0
    wall = time.perf_counter() - started
    log.info("trained desc=%s lr=%.3g steps=%d heldout_accuracy=%.4f heldout_loss=%.4f wall_s=%.1f",
             desc, train_config.lr, train_config.steps, final["heldout_accuracy"], final["heldout_loss"], wall)
    model.eval()
    return SequenceRun(model=model, lr=train_config.lr, history=history, final=final, wall_time_s=wall,
                       model_config=model_config.to_dict())


def best_run(runs: list[SequenceRun]) -> SequenceRun:
    """Return the run with the highest end-of-training accuracy, ties broken by the lower training loss.

    Both come from the last logging window of training, so choosing the learning rate never looks at
    the held-out set. Diverged runs lose to any finished run.
    """
    if not runs:
        raise ValueError("best_run needs at least one run; sweep at least one learning rate")
    return min(runs, key=lambda run: (run.final["diverged"], -run.final["end_train_accuracy"],
                                      run.final["end_train_loss"]))
