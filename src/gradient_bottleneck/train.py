"""Training loop for TinyLM: AdamW, linear warm-up then cosine decay, held-out evaluation,
checkpoints that resume exactly, and seeds everywhere.

The same loop runs at GPU scale: bf16 autocast, fused AdamW, optional torch.compile, gradient
accumulation, and data parallelism (DistributedDataParallel, or FSDP for models that do not fit
one GPU) inside a process group that torchrun started (see distributed.py and pretrain.py). The
defaults train in fp32 in one process, exactly as before those options existed.

A run directory holds:
    last.pt                 full state (model, optimizer, step, sampler RNG) for resuming;
    checkpoints/step_N.pt   model weights at each checkpoint step, for measurements over training;
    history.json            evaluation curve and the configs, written atomically.
All checkpoints load with torch.load(weights_only=True).
"""

import hashlib
import io
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model import ModelConfig, TinyLM
from .results import atomic_write_bytes, write_json
from .tokenizer import TokenStream

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # B sequences of context_length tokens per step
    lr: float = 3e-3  # peak learning rate after warm-up
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 50  # steps between held-out evaluations (and the final step)
    eval_batches: int = 8
    checkpoint_every: int = 0  # steps between weight snapshots in checkpoints/; 0 keeps only the final one
    seed: int = 0
    device: str = "auto"  # "auto" picks CUDA when available, else CPU
    # GPU-scale options; the defaults reproduce the plain fp32 single-process loop.
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimizer step (per process)
    precision: str = "fp32"  # "bf16" runs forward passes under bfloat16 autocast; weights stay fp32
    fused_adamw: bool = False  # the fused AdamW kernel (CUDA, or CPU with torch >= 2.4)
    compile: bool = False  # torch.compile the model for the training forward pass
    parallel: str = "none"  # "ddp" or "fsdp" inside a torchrun process group; "none" for one process

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "grad_accum_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be in [0, steps={self.steps}]")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate lr={self.lr!r} must be a positive finite number, e.g. 3e-3")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be >= 0 (0 = final only)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={self.parallel!r} must be one of {PARALLEL_MODES}")


PRECISIONS = ("fp32", "bf16")
PARALLEL_MODES = ("none", "ddp", "fsdp")


def _config_matches(saved: dict, config: TrainConfig) -> bool:
    """Compare a checkpoint's train config with `config`, reading fields the checkpoint predates
    as their defaults, so runs saved before an option existed still resume."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {**defaults, **saved} == asdict(config)


def autocast_context(device: torch.device, precision: str):
    """bfloat16 autocast for precision="bf16"; a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return device


def progress_disabled() -> bool:
    """Return True when progress bars should stay silent.

    They are silent when the CI variable is set, to keep logs readable, and when
    GRADIENT_BOTTLENECK_PROGRESS is 0, false, no or off. `make reproduce` sets the latter because
    under papermill every bar update becomes one more stderr output in the executed notebook.
    """
    setting = os.environ.get("GRADIENT_BOTTLENECK_PROGRESS", "").strip().lower()
    return bool(os.environ.get("CI")) or setting in ("0", "false", "no", "off")


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def sample_batch(stream: TokenStream, batch_size: int, time: int, generator: torch.Generator):
    """Draw B random windows of T + 1 tokens; returns inputs and next-token targets (B, T)."""
    if len(stream.tokens) <= time + 1:
        raise ValueError(f"token stream of {len(stream.tokens)} tokens is too short for context_length={time}")
    starts = torch.randint(0, len(stream.tokens) - time - 1, (batch_size,), generator=generator)
    windows = torch.stack([stream.tokens[s:s + time + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def evaluation_batches(stream: TokenStream, n_batches: int, batch_size: int, time: int):
    """Return fixed, evenly spaced held-out windows so every evaluation sees the same tokens."""
    count = n_batches * batch_size
    span = len(stream.tokens) - time - 1
    if span <= 0:
        raise ValueError(f"held-out stream of {len(stream.tokens)} tokens is too short for context_length={time}")
    starts = torch.linspace(0, span - 1, count).long()
    windows = torch.stack([stream.tokens[s:s + time + 1] for s in starts.tolist()])
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


@torch.no_grad()
def evaluate(model: TinyLM, batches, device: torch.device, precision: str = "fp32") -> dict:
    """Return mean held-out cross-entropy (nats/token) and next-token accuracy."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device).long(), targets.to(device).long()
        with autocast_context(device, precision):
            logits, loss = model(inputs, targets)
        loss_sum += float(loss) * targets.numel()
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    model.train(was_training)
    return {"heldout_loss": loss_sum / count, "heldout_accuracy": correct / count}


def _torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; a damaged file raises naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError or UnpicklingError on damaged files
        raise RuntimeError(
            f"checkpoint {path} is corrupted or truncated ({type(exc).__name__}: {exc}); delete it and retrain"
        ) from exc


def model_from_checkpoint(path: str | os.PathLike, map_location="cpu") -> TinyLM:
    state = load_checkpoint(path, map_location)
    if not isinstance(state, dict) or "model_config" not in state or "model" not in state:
        raise ValueError(
            f"{path} is not a TinyLM checkpoint: it lacks the 'model_config' and 'model' entries that "
            "train() writes; pass a file from a run's checkpoints/ folder or its last.pt"
        )
    model = TinyLM(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model


def run_key(model_config: ModelConfig, train_config: TrainConfig, data_key: str) -> str:
    """Hash the configs, the data identity and this package's model, loss and trainer source.

    Including the source means editing model.py, chunked_loss.py or train.py invalidates cached runs.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([model_config.to_dict(), asdict(train_config), data_key], sort_keys=True).encode())
    for module in ("model.py", "chunked_loss.py", "train.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class TrainResult:
    model: TinyLM
    history: list[dict]  # one row per evaluation: step, tokens_seen, lr, train_loss, heldout_*
    run_dir: Path | None
    resumed_from_step: int
    wall_time_s: float
    stopped_at_step: int | None = None  # set when stop_after_step ended the run early

    def checkpoint_paths(self) -> list[Path]:
        if self.run_dir is None:
            return []
        return sorted((self.run_dir / "checkpoints").glob("step_*.pt"))


def _process_group() -> tuple[int, int]:
    """Return (rank, world size) of the initialised process group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "parallel='ddp' or 'fsdp' needs a torch.distributed process group; launch with torchrun "
            "(python -m gradient_bottleneck.pretrain) or use parallel='none'"
        )
    return dist.get_rank(), dist.get_world_size()


def _barrier(parallel: str) -> None:
    if parallel != "none":
        import torch.distributed as dist

        dist.barrier()


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_stream: TokenStream,
    heldout_stream: TokenStream,
    run_dir: str | os.PathLike | None = None,
    desc: str = "train",
    *,
    stop_after_step: int | None = None,
) -> TrainResult:
    """Train a TinyLM from scratch, or resume from run_dir/last.pt when it exists.

    With run_dir set, a finished run is loaded from disk without training again, because
    last.pt records the completed step count. stop_after_step=k saves the full state after
    step k and returns, as if the run had been interrupted there; calling train again with
    the same arguments resumes and ends where an uninterrupted run ends.

    With parallel="ddp" or "fsdp" every process of the group calls train with the same
    arguments. All processes draw the windows of one optimizer step from one shared generator
    (B x world size windows per micro-batch) and each takes its own B, so a run on N
    processes sees the same data as one process with batch N B, and the generator's state is
    a single data position that resumes on any number of processes. Only rank 0 writes files.
    """
    # Phase 1: set-up. Seeds fix initialisation, batch order and evaluation windows.
    if train_stream.vocab_size != model_config.vocab_size:
        raise ValueError(f"token stream has V={train_stream.vocab_size} but the model has V={model_config.vocab_size}")
    if stop_after_step is not None and not 1 <= stop_after_step <= train_config.steps:
        raise ValueError(f"stop_after_step={stop_after_step} must lie in [1, steps={train_config.steps}]")
    parallel = train_config.parallel
    rank, world = _process_group() if parallel != "none" else (0, 1)
    if parallel == "fsdp" and model_config.head == "backward_only":
        # NOTE: FSDP frees the gathered head weight after the forward pass, and the backward-only
        # projection needs it in the backward pass; this combination is not supported yet.
        raise ValueError("head='backward_only' does not support parallel='fsdp'; use parallel='ddp'")
    device = select_device(train_config.device)
    torch.manual_seed(train_config.seed)
    model = TinyLM(model_config).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    # Wrap for data parallelism before the optimizer is built: FSDP replaces the parameters.
    wrapped = model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif parallel == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(model, use_orig_params=True,
                                           device_id=device if device.type == "cuda" else None)
        # FSDP exposes flattened shards, so the weight-decay split goes by the original names.
        decay_names = {n for n, p in model.named_parameters() if p.dim() >= 2}
        named = [(n.replace("_fsdp_wrapped_module.", ""), p) for n, p in wrapped.named_parameters()]
        decay = [p for n, p in named if n in decay_names]
        no_decay = [p for n, p in named if n not in decay_names]
    adamw_options = {"fused": True} if train_config.fused_adamw else {}
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_config.lr, betas=(0.9, 0.95), **adamw_options,
    )
    forward = torch.compile(wrapped) if train_config.compile else wrapped
    generator = torch.Generator().manual_seed(train_config.seed)
    eval_batches = evaluation_batches(heldout_stream, train_config.eval_batches, train_config.batch_size,
                                      model_config.context_length)
    accum = train_config.grad_accum_steps
    tokens_per_step = train_config.batch_size * model_config.context_length * accum * world
    history: list[dict] = []
    start_step = 0
    train_loss_sum, train_loss_count = 0.0, 0
    run_dir = Path(run_dir) if run_dir is not None else None
    started = time.perf_counter()

    def full_state_dicts() -> tuple[dict, dict]:
        """Model and optimizer state as one process would hold them (FSDP gathers the shards)."""
        if parallel != "fsdp":
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(wrapped, options=options),
                get_optimizer_state_dict(wrapped, optimizer, options=options))

    # Phase 2: resume from the last full checkpoint when the run directory has one. A process
    # killed mid-write leaves only temporary files (atomic_write_bytes renames on success), so
    # they carry nothing worth keeping and are removed.
    if run_dir is not None:
        for stray in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp")]:
            stray.unlink(missing_ok=True)
            log.info("removed temporary file of an interrupted write path=%s", stray)
    if run_dir is not None and (run_dir / "last.pt").exists():
        state = load_checkpoint(run_dir / "last.pt", map_location=device if parallel != "fsdp" else "cpu")
        if state["model_config"] != model_config.to_dict() or not _config_matches(state["train_config"], train_config):
            raise ValueError(f"run directory {run_dir} belongs to a different configuration; use another run_dir")
        if parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(wrapped, state["model"], options=options)
            set_optimizer_state_dict(wrapped, optimizer, state["optimizer"], options=options)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        start_step, history = state["step"], json.loads(state["history_json"])
        train_loss_sum = state.get("train_loss_sum", 0.0)
        train_loss_count = state.get("train_loss_count", 0)
        log.info("resumed run_dir=%s step=%d", run_dir, start_step)

    def save_state(step: int) -> None:
        model_state, optimizer_state = full_state_dicts()  # collective under FSDP: every rank calls it
        if rank == 0:
            state = {
                "model": model_state, "optimizer": optimizer_state, "step": step,
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "model_config": model_config.to_dict(), "train_config": asdict(train_config),
                "history_json": json.dumps(history),
                # The running mean of the training loss since the last evaluation, so a run resumed
                # between evaluations reports the same train_loss as an uninterrupted one.
                "train_loss_sum": train_loss_sum, "train_loss_count": train_loss_count,
            }
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            atomic_write_bytes(run_dir / "last.pt", _torch_save_bytes(state))
        _barrier(parallel)

    def save_snapshot(step: int) -> None:
        model_state = full_state_dicts()[0] if parallel == "fsdp" else model.state_dict()
        if rank == 0:
            snapshot = {"model": model_state, "model_config": model_config.to_dict(), "step": step}
            atomic_write_bytes(run_dir / "checkpoints" / f"step_{step:06d}.pt", _torch_save_bytes(snapshot))
        _barrier(parallel)

    if run_dir is not None and start_step == 0:
        save_snapshot(0)  # the initialisation, so measurements can start from step 0

    # Phase 3: the loop. One optimizer step per `accum` micro-batches; evaluate and checkpoint on schedule.
    wrapped.train()
    stopped_at = None
    steps = range(start_step, train_config.steps)
    bar = tqdm(steps, desc=desc, disable=progress_disabled() or rank != 0, leave=False)
    for step in bar:
        lr = learning_rate(step, train_config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(accum):
            inputs, targets = sample_batch(train_stream, train_config.batch_size * world,
                                           model_config.context_length, generator)
            if world > 1:
                mine = slice(rank * train_config.batch_size, (rank + 1) * train_config.batch_size)
                inputs, targets = inputs[mine], targets[mine]
            # DDP all-reduces gradients on the last micro-batch only.
            sync = nullcontext() if parallel != "ddp" or micro == accum - 1 else wrapped.no_sync()
            with sync:
                with autocast_context(device, train_config.precision):
                    # Only the loss is needed, so the chunked loss skips storing the (B, T, V) logits.
                    _, loss = forward(inputs.to(device).long(), targets.to(device).long(), return_logits=False)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss.item()} at step {step} with lr={lr:.3g}; lower the learning "
                        "rate or check the data"
                    )
                (loss / accum if accum > 1 else loss).backward()
            step_loss += loss.item()
        if train_config.grad_clip > 0:
            if parallel == "fsdp":
                wrapped.clip_grad_norm_(train_config.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        train_loss_sum += step_loss / accum if accum > 1 else step_loss
        train_loss_count += 1

        done = step + 1
        if done % train_config.eval_every == 0 or done == train_config.steps:
            row = {"step": done, "tokens_seen": done * tokens_per_step, "lr": lr,
                   "train_loss": train_loss_sum / train_loss_count,
                   **evaluate(wrapped, eval_batches, device, train_config.precision)}
            history.append(row)
            train_loss_sum, train_loss_count = 0.0, 0
            bar.set_postfix(heldout_loss=f"{row['heldout_loss']:.3f}")
            log.info("eval step=%d tokens=%d heldout_loss=%.4f heldout_accuracy=%.4f",
                     done, row["tokens_seen"], row["heldout_loss"], row["heldout_accuracy"])
        stop_now = stop_after_step is not None and done == stop_after_step and done < train_config.steps
        if run_dir is not None:
            snapshot_due = train_config.checkpoint_every and done % train_config.checkpoint_every == 0
            if snapshot_due or done == train_config.steps:
                save_snapshot(done)
            if snapshot_due or done == train_config.steps or done % train_config.eval_every == 0 or stop_now:
                save_state(done)
        if stop_now:
            stopped_at = done
            log.info("stopped step=%d run_dir=%s", done, run_dir)
            break
    bar.close()

    # Phase 4: record the finished run.
    if run_dir is not None and stopped_at is None and rank == 0:
        write_json(run_dir / "history.json", {"model_config": model_config.to_dict(),
                                              "train_config": asdict(train_config), "history": history})
    _barrier(parallel)
    model.eval()
    return TrainResult(model, history, run_dir, start_step, time.perf_counter() - started, stopped_at)
