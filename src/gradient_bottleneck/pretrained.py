"""Destroyed ratio, visible cosine and the logit-gradient spectrum of Hugging Face causal LMs.

A causal LM maps final hidden states H (C, D), taken after the final norm, through its LM head to
the head's linear output A = H W^T + b (C, V), and some models then rescale or soft-cap it into
the logits Z = phi(A). The backbone receives dLoss/dH = G_A W, where by the chain rule

    G_A = dLoss/dA = G_Z * phi'(A)   (elementwise),   G_Z = diag(f) (softmax(Z) - N~).

So the destroyed ratio is measured on G_A, the gradient at the head's linear output. For a
constant logit scale s, G_A = s G_Z and the ratio is unchanged. For soft-capping
Z = c tanh(s A / c) the factor phi'(A) = s (1 - tanh^2(s A / c)) differs per entry.

Models load with `local_files_only=True` unless the caller passes `allow_download=True`, and
always with `trust_remote_code=False`. The head, the final hidden states and the logit map are
discovered generically from `get_output_embeddings()`, `base_model(...).last_hidden_state` and
config fields. A probe sequence then verifies them: the reconstructed logits must equal the
model's own, and hidden states must not depend on later tokens. UNSUPPORTED lists what is rejected.

Text streams document by document into windows of at most T + 1 tokens. Hidden states are
computed one batch at a time and projected in float32 chunks of tokens, so memory is bounded by
the model, the head, the projector's D x D matrices and one chunk of C x V logits.
"""

import hashlib
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .gradients import logit_gradient
from .projection import GRAM_RTOL_FLOOR, HeadProjector, ProjectionStats, random_baseline
from .paths import CACHE_DIR
from .train import progress_disabled, select_device

log = logging.getLogger(__name__)

# Kinds of model this module rejects, with the reason. Error messages quote these reasons.
UNSUPPORTED = {
    "encoder-decoder models (T5, BART, Whisper, ...)":
        "their logits depend on an encoder input as well as the text, which this next-token measurement does not feed",
    "encoder-only and masked LMs (BERT, RoBERTa, ...)":
        "their hidden states see later tokens, so the next-token logit gradient is not their training signal",
    "heads that are not one linear map (adaptive softmax, mixture of softmaxes, several codebooks)":
        "the measurement needs a single head W (V, D) with logits that are a function of H W^T + b",
    "quantised heads (int8, 4-bit)":
        "the head weight must be a floating-point tensor to build the projection onto col(W)",
    "models that need trust_remote_code":
        "their modeling code is not part of transformers and is never executed by this package",
    "logit maps other than a constant scale or tanh soft-capping":
        "the probe rejects any model whose logits differ from phi(H W^T + b) for a known phi",
}

# Config fields that transformers models apply between the head's linear output and the logits.
SCALE_MULTIPLIERS = ("logit_scale",)  # Cohere: Z = A * logit_scale
SCALE_DIVISORS = ("logits_scaling",)  # Granite: Z = A / logits_scaling
SOFTCAP_FIELDS = ("final_logit_softcapping",)  # Gemma 2 and 3: Z = c tanh(A / c)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_SPEC = re.compile(r"^tiny-(gpt2|llama)-d(\d+)-(tied|untied)$")
TRAINED_SPEC = re.compile(r"^trained-d(\d+)$")


class UnsupportedModelError(ValueError):
    """The model loads but its head or hidden states do not fit the measurement."""


def unsupported_summary() -> str:
    """Return one line per unsupported kind of model, with the reason."""
    return "\n".join(f"  - {kind}: {reason}" for kind, reason in UNSUPPORTED.items())


@dataclass(frozen=True)
class LogitMap:
    """Z = phi(A) for the head's linear output A: phi(A) = c tanh(s A / c), or s A when c is None."""

    scale: float = 1.0  # s
    softcap: float | None = None  # c

    def logits(self, pre_logits: torch.Tensor) -> torch.Tensor:
        scaled = pre_logits * self.scale
        if self.softcap is None:
            return scaled
        return self.softcap * torch.tanh(scaled / self.softcap)

    def derivative(self, pre_logits: torch.Tensor) -> torch.Tensor | float:
        """Return dZ/dA, elementwise (a float when phi is linear)."""
        if self.softcap is None:
            return self.scale
        return self.scale * (1.0 - torch.tanh(pre_logits * self.scale / self.softcap).pow(2))


def logit_map_from_config(config) -> LogitMap:
    """Read the logit scale and soft-cap a transformers config declares (1 and None when absent)."""
    scale = 1.0
    for name in SCALE_MULTIPLIERS:
        value = getattr(config, name, None)
        if value is not None:
            scale *= float(value)
    for name in SCALE_DIVISORS:
        value = getattr(config, name, None)
        if value is not None:
            scale /= float(value)
    softcap = None
    for name in SOFTCAP_FIELDS:
        value = getattr(config, name, None)
        if value:
            softcap = float(value)
    return LogitMap(scale, softcap)


@dataclass
class LoadedCausalLM:
    """A causal LM with its discovered head, ready for measurement."""

    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer
    source: str  # the local directory or hub id it was loaded from
    head_weight: torch.Tensor  # W (V, D), shared with the model (tied heads share the embedding)
    head_bias: torch.Tensor | None  # b (V,) or None
    logit_map: LogitMap
    tied: bool  # W is the input embedding matrix
    context_length: int  # window length T in tokens, at most the model's maximum sequence length
    device: torch.device
    probe_max_logit_error: float = 0.0  # max |Z_model - phi(H W^T + b)| on the probe sequence

    @property
    def vocab_size(self) -> int:
        return self.head_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.head_weight.shape[1]

    def describe(self) -> dict:
        return {
            "model": self.source,
            "architecture": type(self.model).__name__,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "tied": self.tied,
            "head_bias": self.head_bias is not None,
            "logit_scale": self.logit_map.scale,
            "logit_softcap": self.logit_map.softcap,
            "dtype": str(self.head_weight.dtype).removeprefix("torch."),
            "device": str(self.device),
            "context_length": self.context_length,
            "probe_max_logit_error": self.probe_max_logit_error,
        }

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the final hidden states H (B, T, D) after the final norm, in the model's dtype."""
        with torch.inference_mode():
            return self.model.base_model(input_ids=input_ids.to(self.device)).last_hidden_state

    def pre_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return A = H W^T + b (C, V) in float32."""
        return head_linear(hidden, self.head_weight, self.head_bias)


def head_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                row_chunk: int = 8192) -> torch.Tensor:
    """Return A = H W^T + b (C, V) in float32; a half-precision head is cast one row block at a time."""
    hidden = hidden.float()
    if weight.dtype == torch.float32:
        out = hidden @ weight.T
    else:
        out = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, weight.shape[0], row_chunk):
            out[:, start:start + row_chunk] = hidden @ weight[start:start + row_chunk].float().T
    if bias is not None:
        out += bias.float()
    return out


def head_gradient(pre_logits: torch.Tensor, logit_map: LogitMap, targets: torch.Tensor,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (G_A, per-token cross-entropy): the gradient at the head's linear output A (C, V).

    G_A = G_Z * phi'(A) with G_Z = diag(f) (softmax(Z) - onehot) and Z = phi(A); weights f (C,)
    default to 1/C.
    """
    logits = logit_map.logits(pre_logits)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    grad = logit_gradient(logits, targets, weights)
    derivative = logit_map.derivative(pre_logits)
    if isinstance(derivative, float):
        if derivative != 1.0:
            grad *= derivative
    else:
        grad *= derivative
    return grad, loss


# ---------------------------------------------------------------------------------------------
# Loading


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists() or name.count("/") > 1


def _resolve_source(name_or_path: str, allow_download: bool) -> tuple[str, bool]:
    """Return (source, local_files_only) after checking that a path-like name exists."""
    if not name_or_path or not str(name_or_path).strip():
        raise ValueError("model name is empty; pass a local directory or a hub id such as 'gpt2'")
    name = str(name_or_path)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model directory {path} not found; pass a folder written by save_pretrained or a hub id"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json, so it is not a saved transformers model")
        return str(path.resolve()), True
    return name, not allow_download


def _offline_hint(source: str, local_only: bool) -> str:
    if local_only:
        return (f"'{source}' is not a local directory and is not in the Hugging Face cache; downloads are off "
                "by default, so pass --allow-download (allow_download=True) with network access, or a local directory")
    return f"check the hub id '{source}' and the network (HF_HUB_OFFLINE must be unset to download)"


def _check_causal_config(config, source: str) -> None:
    """Reject encoder-decoder and non-causal architectures named in the config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{source} ({config.model_type}) is an encoder-decoder model, which is not supported: "
            f"{UNSUPPORTED['encoder-decoder models (T5, BART, Whisper, ...)']}"
        )
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name in causal_classes for name in architectures):
        raise UnsupportedModelError(
            f"{source} declares architectures {architectures}, which is not a causal LM such as "
            f"GPT2LMHeadModel or LlamaForCausalLM; {UNSUPPORTED['encoder-only and masked LMs (BERT, RoBERTa, ...)']}"
        )
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{source} has model_type={config.model_type!r}, which has no causal-LM class in transformers "
            f"{transformers_version()}; `python -m gradient_bottleneck measure --help` lists what is supported"
        )


def transformers_version() -> str:
    from importlib import metadata

    return metadata.version("transformers")


def _context_length(config, requested: int | None) -> int:
    limit = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    if requested is None:
        return min(limit or 1024, 1024)
    if requested < 2:
        raise ValueError(f"context length T={requested} must be >= 2 (one input and one target token)")
    if limit is not None and requested > limit:
        raise ValueError(f"context length T={requested} exceeds the model's limit of {limit} positions; use T <= {limit}")
    return requested


def _find_head(model, source: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UnsupportedModelError(
            f"{source} ({type(model).__name__}) has output head {type(head).__name__}, not a single "
            f"torch.nn.Linear: {UNSUPPORTED['heads that are not one linear map (adaptive softmax, mixture of softmaxes, several codebooks)']}"
        )
    weight = head.weight
    if not weight.dtype.is_floating_point:
        raise UnsupportedModelError(
            f"{source} has a head weight of dtype {weight.dtype}: {UNSUPPORTED['quantised heads (int8, 4-bit)']}"
        )
    embedding = model.get_input_embeddings()
    tied = embedding is not None and getattr(embedding, "weight", None) is not None \
        and embedding.weight.data_ptr() == weight.data_ptr()
    return weight.detach(), (head.bias.detach() if head.bias is not None else None), tied


def _probe(loaded: LoadedCausalLM, length: int = 12) -> None:
    """Check the discovered head and causality on one fixed sequence; raise UnsupportedModelError otherwise."""
    length = min(length, loaded.context_length)
    vocab = min(loaded.vocab_size, len(loaded.tokenizer)) if loaded.tokenizer is not None else loaded.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, length), generator=generator)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    half = loaded.head_weight.dtype in (torch.float16, torch.bfloat16)

    with torch.inference_mode():
        model_logits = loaded.model(input_ids=ids.to(loaded.device)).logits[0].float()
        hidden = loaded.hidden_states(ids)[0]
        hidden_changed = loaded.hidden_states(changed)[0]
    if hidden.shape[-1] != loaded.hidden_size:
        raise UnsupportedModelError(
            f"{loaded.source}: the base model's hidden states have width {hidden.shape[-1]} but the head "
            f"expects D={loaded.hidden_size}; the head is not applied to the final hidden states directly"
        )
    leak = float((hidden[:-1].float() - hidden_changed[:-1].float()).abs().max()) if length > 1 else 0.0
    if leak > (1e-2 if half else 1e-5) * (1.0 + float(hidden.float().abs().max())):
        raise UnsupportedModelError(
            f"{loaded.source} is not causal: changing only the last token changed earlier hidden states by "
            f"up to {leak:.3g}; {UNSUPPORTED['encoder-only and masked LMs (BERT, RoBERTa, ...)']}"
        )

    ours = loaded.logit_map.logits(loaded.pre_logits(hidden))
    error = float((model_logits - ours).abs().max())
    tolerance = (3e-2 if half else 1e-4) * (1.0 + float(model_logits.abs().max()))
    if not error <= tolerance:
        raise UnsupportedModelError(
            f"{loaded.source}: the model's logits differ from phi(H W^T + b) by up to {error:.3g} "
            f"(tolerance {tolerance:.3g}) with H the base model's last hidden state and phi {loaded.logit_map}; "
            f"{UNSUPPORTED['logit maps other than a constant scale or tanh soft-capping']}"
        )
    loaded.probe_max_logit_error = error


def load_causal_lm(name_or_path: str, allow_download: bool = False, dtype: str = "auto",
                   device: str = "auto", tokenizer: str | None = None,
                   context_length: int | None = None) -> LoadedCausalLM:
    """Load a transformers causal LM and its tokenizer, discover its head and verify it on a probe.

    name_or_path: a folder written by save_pretrained, or a hub id (cached locally unless
    allow_download). dtype: "auto" keeps the checkpoint's dtype, else float32/bfloat16/float16.
    tokenizer: a folder or hub id when the model folder has none. context_length: the window T
    in tokens (default min(1024, the model's limit)).
    Raises FileNotFoundError, UnsupportedModelError (a ValueError) or RuntimeError with the fix.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if progress_disabled():
        transformers.utils.logging.disable_progress_bar()
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    source, local_only = _resolve_source(name_or_path, allow_download)
    common = {"local_files_only": local_only, "trust_remote_code": False}

    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the config of model {source}: {_offline_hint(source, local_only)}") from exc
    except ValueError as exc:
        # transformers raises ValueError for unknown model types and for repositories with custom code.
        raise UnsupportedModelError(
            f"cannot load the config of model {source} ({exc}); "
            f"{UNSUPPORTED['models that need trust_remote_code']}"
        ) from exc
    _check_causal_config(config, source)
    context = _context_length(config, context_length)

    torch_device = select_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES.get(dtype, "auto"), **common)
    except OSError as exc:
        if Path(source).is_dir():
            raise FileNotFoundError(
                f"cannot load the weights of model {source} ({exc}); the folder needs model.safetensors "
                "(or pytorch_model.bin) written by save_pretrained next to its config.json"
            ) from exc
        raise FileNotFoundError(f"cannot load the weights of model {source}: {_offline_hint(source, local_only)}") from exc
    except (ValueError, KeyError, TypeError, ImportError) as exc:
        raise UnsupportedModelError(f"transformers failed to build model {source}: {type(exc).__name__}: {exc}") from exc
    model.to(torch_device).eval()

    tokenizer_source = tokenizer or source
    if tokenizer is not None and _looks_like_path(tokenizer):
        tokenizer_source = str(Path(tokenizer).expanduser())
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_source, **common)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileNotFoundError(
            f"no usable tokenizer for {tokenizer_source} ({type(exc).__name__}: {exc}); save one with "
            "tokenizer.save_pretrained(model_dir) or pass --tokenizer FOLDER_OR_HUB_ID"
        ) from exc
    # Documents longer than the model's window are split into windows here, so silence the
    # tokenizer's "sequence longer than the maximum" warning.
    tok.model_max_length = int(1e12)

    weight, bias, tied = _find_head(model, source)
    if len(tok) > weight.shape[0]:
        raise UnsupportedModelError(
            f"the tokenizer of {tokenizer_source} has {len(tok)} tokens but the head of {source} has only "
            f"V={weight.shape[0]} rows; pass the tokenizer the model was trained with"
        )
    loaded = LoadedCausalLM(model=model, tokenizer=tok, source=source, head_weight=weight, head_bias=bias,
                            logit_map=logit_map_from_config(config), tied=tied, context_length=context,
                            device=torch_device)
    _probe(loaded)
    log.info("model loaded source=%s V=%d D=%d tied=%s bias=%s scale=%g softcap=%s dtype=%s device=%s",
             source, loaded.vocab_size, loaded.hidden_size, tied, bias is not None, loaded.logit_map.scale,
             loaded.logit_map.softcap, weight.dtype, torch_device)
    return loaded


# ---------------------------------------------------------------------------------------------
# Text to token windows


def text_files(path: str | Path) -> list[Path]:
    """Return the text files to read: `path` itself, or every *.txt below a folder, sorted."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt files in {path}; pass a text file or a folder of .txt documents")
        return files
    raise FileNotFoundError(f"text path {path} not found; pass a UTF-8 text file or a folder of .txt files")


def text_documents(source: str | Path, allow_download: bool = False, text_field: str = "text"):
    """Return the documents of `source`: a list of .txt paths, or an iterator of texts.

    .jsonl and .parquet files (field `text_field`) and "hf:NAME[:CONFIG]" Hugging Face datasets
    stream through `external_corpus.iter_documents`; a dataset needs allow_download and the
    `datasets` package. Plain text files and folders of .txt files give a list of paths, so their
    number of documents is known in advance.
    """
    name = str(source)
    if name.startswith("hf:") or Path(name).suffix in (".jsonl", ".parquet"):
        from .external_corpus import iter_documents

        return iter_documents(name, text_field=text_field, allow_download=allow_download)
    return text_files(source)


def token_windows(tokenizer, documents, max_tokens: int, context_length: int) -> list[torch.Tensor]:
    """Cut documents into windows of at most T + 1 token ids, T = context_length.

    documents: a list of text files (one document each) or an iterable of document texts. Each
    document is tokenized with the tokenizer's special tokens (e.g. BOS). A window of L ids
    supplies L - 1 next-token targets and consecutive windows overlap by one id, so every token
    after a document's first is a target once. For a list of files the budget of `max_tokens`
    targets is spread evenly, and a short document's unused share passes to the next ones. For
    a stream of unknown length each document gives at most one window of T targets, so the
    budget covers about max_tokens / T documents.
    """
    if max_tokens < 1:
        raise ValueError(f"token budget {max_tokens} must be >= 1")
    count = len(documents) if isinstance(documents, (list, tuple)) else None
    windows: list[torch.Tensor] = []
    remaining = max_tokens
    seen = blank = 0
    for index, document in enumerate(documents):
        if remaining == 0:
            break
        seen += 1
        share = math.ceil(remaining / (count - index)) if count is not None else min(remaining, context_length)
        if isinstance(document, Path):
            try:
                text = document.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{document} is not UTF-8 text ({exc}); convert it or remove it") from exc
        else:
            text = document
        if not text.strip():
            log.info("empty document skipped index=%d", index)
            blank += 1
            continue
        # Tokenize a prefix of 16 characters per token of the share (English BPE averages about 4),
        # so a huge document is never tokenized whole. A shortfall passes to later documents.
        ids = tokenizer(text[: 16 * (share + 1) + 1024], add_special_tokens=True)["input_ids"]
        ids = torch.tensor(ids[: share + 1], dtype=torch.long)
        if len(ids) < 2:
            continue
        for start in range(0, len(ids) - 1, context_length):
            windows.append(ids[start:start + context_length + 1])
        remaining -= len(ids) - 1
    if not windows:
        if seen == 0:
            raise ValueError("the text source contains no documents; pass a file or folder with text")
        if blank == seen:
            raise ValueError(f"the text is empty ({seen} blank document(s)); pass text with at least two tokens")
        raise ValueError(f"the text is shorter than two tokens in every one of {seen} document(s); pass longer text")
    return windows


def _batches(windows: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Group consecutive windows of equal length into (B, L) batches, so no padding is needed."""
    group: list[torch.Tensor] = []
    for window in windows:
        if group and (len(window) != len(group[0]) or len(group) == batch_size):
            yield torch.stack(group)
            group = []
        group.append(window)
    if group:
        yield torch.stack(group)


def iter_hidden_chunks(loaded: LoadedCausalLM, windows: list[torch.Tensor], batch_size: int = 4,
                       progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (H (C, D) final hidden states, targets (C,)) one batch of windows at a time."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be >= 1")
    total = sum(len(w) - 1 for w in windows)
    bar = tqdm(total=total, unit="tok", desc=Path(loaded.source).name, disable=not progress or progress_disabled())
    for batch in _batches(windows, batch_size):
        hidden = loaded.hidden_states(batch[:, :-1])
        targets = batch[:, 1:].reshape(-1).to(loaded.device)
        bar.update(targets.numel())
        yield hidden.reshape(-1, hidden.shape[-1]), targets
    bar.close()


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Measurement:
    """The projection statistics of one model on one text, with its loss and timing."""

    stats: ProjectionStats
    loss_sum: float = 0.0  # sum of per-token cross-entropies, nats
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        stats = self.stats.summary()
        vocab, width = self.info["vocab_size"], self.info["hidden_size"]
        return {
            **self.info,
            **stats,
            "random_baseline": random_baseline(width, vocab) if width < vocab else 0.0,
            "loss": self.loss_sum / stats["tokens"],
            "seconds": self.seconds,
        }


def head_projector(head_weight: torch.Tensor, row_chunk: int = 8192) -> HeadProjector:
    """Build the projector onto col(W) of the head exactly as stored, whatever its dtype.

    HeadProjector's default tolerance grows with eps(W.dtype), which for a bfloat16 head drops
    every direction with s_i < 0.08 s_max. The model computes its logits with the stored W, so
    its column space is exact, and only the float64 Gram matrix's rounding (GRAM_RTOL_FLOOR)
    limits which directions count.
    """
    return HeadProjector(head_weight, rtol=GRAM_RTOL_FLOOR, row_chunk=row_chunk)


def measure_hidden_states(chunks, head_weight: torch.Tensor, head_bias: torch.Tensor | None = None,
                          logit_map: LogitMap = LogitMap(), projector: HeadProjector | None = None,
                          chunk_size: int = 512, row_chunk: int = 8192) -> tuple[ProjectionStats, float]:
    """Accumulate the destroyed ratio of G_A over (H (C, D), targets (C,)) chunks.

    Returns the statistics and the summed cross-entropy in nats. Rows of G_A use weight 1 per
    token: the ratios are invariant to per-token weights, so no token count is needed in advance.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk size {chunk_size} must be >= 1 token")
    projector = projector or head_projector(head_weight, row_chunk)
    stats = ProjectionStats(head_rank=projector.rank)
    loss_sum = 0.0
    with torch.inference_mode():
        for hidden, targets in chunks:
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                pre = head_linear(hidden[rows], head_weight, head_bias, row_chunk)
                ones = torch.ones(pre.shape[0], dtype=torch.float32, device=pre.device)
                grad, loss = head_gradient(pre, logit_map, targets[rows], ones)
                del pre
                stats.update(grad, projector.visible_coordinates(grad))
                loss_sum += float(loss.double().sum())
    if stats.num_tokens == 0:
        raise ValueError("no tokens were measured; pass text with at least two tokens")
    return stats, loss_sum


def measure_model(loaded: LoadedCausalLM, text: str | Path, max_tokens: int = 4096, batch_size: int = 4,
                  chunk_size: int = 512, progress: bool = True, allow_download: bool = False,
                  text_field: str = "text") -> Measurement:
    """Measure destroyed ratio and visible cosine of G_A on up to `max_tokens` targets of `text`.

    text: anything `text_documents` accepts (a .txt file or folder, .jsonl, .parquet, hf:NAME).
    """
    started = time.perf_counter()
    documents = text_documents(text, allow_download, text_field)
    windows = token_windows(loaded.tokenizer, documents, max_tokens, loaded.context_length)
    projector = head_projector(loaded.head_weight)
    chunks = iter_hidden_chunks(loaded, windows, batch_size, progress)
    stats, loss_sum = measure_hidden_states(chunks, loaded.head_weight, loaded.head_bias, loaded.logit_map,
                                            projector, chunk_size)
    values = projector.singular_values
    info = {**loaded.describe(), "text": str(text),
            "head_singular_value_ratio": float(values[0] / values[-1]) if values[-1] > 0 else math.inf,
            "documents": len(documents) if isinstance(documents, list) else None, "windows": len(windows)}
    measurement = Measurement(stats, loss_sum, time.perf_counter() - started, info)
    log.info("measured model=%s tokens=%d destroyed_ratio=%.5f visible_cosine=%.5f seconds=%.1f",
             loaded.source, stats.num_tokens, stats.destroyed_ratio, stats.visible_cosine, measurement.seconds)
    return measurement


def head_gradient_matrix(loaded: LoadedCausalLM, text: str | Path, max_tokens: int, batch_size: int = 4,
                         progress: bool = True, allow_download: bool = False, text_field: str = "text") -> torch.Tensor:
    """Return G_A (C, V) in float32 for up to `max_tokens` targets, rows weighted 1/C.

    The result keeps all of G in memory (C x V x 4 bytes), so use it for spectra of moderate C only.
    """
    windows = token_windows(loaded.tokenizer, text_documents(text, allow_download, text_field), max_tokens,
                            loaded.context_length)
    num_tokens = sum(len(w) - 1 for w in windows)
    grad = torch.empty(num_tokens, loaded.vocab_size, dtype=torch.float32, device=loaded.device)
    offset = 0
    with torch.inference_mode():
        for hidden, targets in iter_hidden_chunks(loaded, windows, batch_size, progress):
            weights = torch.full((hidden.shape[0],), 1.0 / num_tokens, device=hidden.device)
            rows, _ = head_gradient(loaded.pre_logits(hidden), loaded.logit_map, targets, weights)
            grad[offset:offset + rows.shape[0]] = rows
            offset += rows.shape[0]
    return grad


# ---------------------------------------------------------------------------------------------
# Tiny models built from a config, for tests and CPU runs


def parse_tiny_spec(spec: str) -> tuple[str, int, bool] | None:
    """Parse "tiny-gpt2-d64-tied" or "tiny-llama-d128-untied" into (family, D, tied); None otherwise."""
    match = TINY_SPEC.match(spec)
    if match is None:
        return None
    family, width, tying = match.groups()
    return family, int(width), tying == "tied"


def build_tiny_model(family: str, width: int, tied: bool, tokenizer, out_dir: str | Path,
                     n_layers: int = 2, context_length: int = 256, seed: int = 0) -> Path:
    """Build a randomly initialised GPT-2 or Llama model from a config and save it with its tokenizer.

    tokenizer: a `tokenizers.Tokenizer` whose size sets V; it is saved as a transformers fast
    tokenizer, so the folder loads like any hub model. Returns the folder.
    """
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if progress_disabled():
        transformers.utils.logging.disable_progress_bar()
    if width < 8 or width % 4:
        raise ValueError(f"tiny model width D={width} must be a multiple of 4 and >= 8")
    vocab_size = tokenizer.get_vocab_size()
    end_of_text = tokenizer.id_to_token(0)
    heads = 4
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=n_layers, n_head=heads,
                            n_positions=context_length, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                             num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=context_length, tie_word_embeddings=tied,
                             bos_token_id=0, eos_token_id=0, pad_token_id=None)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny model family {family!r}; use gpt2 or llama")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end_of_text)
    fast.save_pretrained(out_dir)
    return out_dir


def export_tinylm_to_gpt2(model, tokenizer, out_dir: str | Path, atol: float = 1e-4) -> Path:
    """Save a trained TinyLM as a transformers GPT-2 model, so it loads like any hub model.

    TinyLM's blocks are GPT-2's: pre-norm LayerNorm (eps 1e-5), causal attention scaled by
    1/sqrt(D / heads), an exact-GELU MLP and learned positions. GPT-2 stores its linear maps as
    Conv1D with (in, out) weights, hence the transposes. A factorised head is saved as its
    product W = A B, which gives the same logits. The export is checked by comparing both
    models' logits on one sequence and raises RuntimeError beyond `atol`.
    tokenizer: the `tokenizers.Tokenizer` the model was trained with (its id 0 is end-of-text).
    """
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if progress_disabled():
        transformers.utils.logging.disable_progress_bar()
    config = model.config
    tied = config.head == "tied"
    gpt2_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.width,
        n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.mlp_ratio * config.width,
        activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )
    gpt2 = GPT2LMHeadModel(gpt2_config)
    state = {"transformer.wte.weight": model.embed.weight, "transformer.wpe.weight": model.pos.weight,
             "transformer.ln_f.weight": model.final_norm.weight, "transformer.ln_f.bias": model.final_norm.bias,
             "lm_head.weight": model.head_weight()}
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.h.{i}."
        state.update({
            prefix + "ln_1.weight": block.norm1.weight, prefix + "ln_1.bias": block.norm1.bias,
            prefix + "attn.c_attn.weight": block.attn.qkv.weight.T, prefix + "attn.c_attn.bias": block.attn.qkv.bias,
            prefix + "attn.c_proj.weight": block.attn.out.weight.T, prefix + "attn.c_proj.bias": block.attn.out.bias,
            prefix + "ln_2.weight": block.norm2.weight, prefix + "ln_2.bias": block.norm2.bias,
            prefix + "mlp.c_fc.weight": block.mlp[0].weight.T, prefix + "mlp.c_fc.bias": block.mlp[0].bias,
            prefix + "mlp.c_proj.weight": block.mlp[2].weight.T, prefix + "mlp.c_proj.bias": block.mlp[2].bias,
        })
    with torch.no_grad():
        gpt2.load_state_dict({name: value.detach().float().contiguous() for name, value in state.items()}, strict=True)
    gpt2.eval()

    ids = torch.randint(0, config.vocab_size, (1, config.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = model.cpu().eval()(ids)
        actual = gpt2(input_ids=ids).logits
    error = float((expected - actual).abs().max())
    if not error <= atol:
        raise RuntimeError(
            f"the GPT-2 export of this TinyLM changes its logits by up to {error:.3g} (> atol={atol}); "
            "model.py and this export no longer describe the same network"
        )
    out_dir = Path(out_dir)
    gpt2.save_pretrained(out_dir)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=tokenizer.id_to_token(0)).save_pretrained(out_dir)
    log.info("TinyLM exported as GPT-2 path=%s D=%d V=%d head=%s max_logit_error=%.2g",
             out_dir, config.width, config.vocab_size, config.head, error)
    return out_dir


def resolve_model_spec(spec: str, tokenizer, train_run=None, n_layers: int = 2, context_length: int = 256,
                       seed: int = 0, cache_dir: Path = CACHE_DIR) -> str:
    """Return a folder or hub id for one entry of a model list.

    "tiny-gpt2-d64-tied" / "tiny-llama-d128-untied": an untrained model built from a config with V
    from `tokenizer`, cached under cache_dir/hf_models/. "trained-d64": the TinyLM that
    `train_run(64)` returns (a TrainResult), exported to GPT-2 format. Anything else is returned
    unchanged as a local folder or hub id.
    """
    tiny = parse_tiny_spec(spec)
    trained = TRAINED_SPEC.match(spec)
    if tiny is None and trained is None:
        return spec
    if trained is not None:
        if train_run is None:
            raise ValueError(f"model {spec!r} needs a training recipe; pass train_run or drop it from the list")
        run = train_run(int(trained.group(1)))
        key = run.run_dir.name if run.run_dir is not None else f"untracked-seed{seed}"
        folder = Path(cache_dir) / "hf_models" / f"{spec}-{key}"
        if not (folder / "config.json").is_file():
            _write_folder(folder, lambda tmp: export_tinylm_to_gpt2(run.model, tokenizer, tmp))
        return str(folder)
    family, width, tied = tiny
    tokenizer_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "hf_models" / f"{spec}-L{n_layers}-T{context_length}-seed{seed}-tok{tokenizer_hash}"
    if not (folder / "config.json").is_file():
        _write_folder(folder, lambda tmp: build_tiny_model(family, width, tied, tokenizer, tmp, n_layers,
                                                           context_length, seed))
    return str(folder)


def _write_folder(folder: Path, write) -> None:
    """Let `write(tmp)` fill a temporary sibling folder, then rename it to `folder`, so a crash
    never leaves a half-written model behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
