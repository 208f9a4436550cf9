"""Benchmarks reported as ratios of two computations timed side by side in one run.

Absolute times on a shared machine drift with its load, so every figure here compares two
computations that alternate round by round on the same inputs, and reports the median of the
per-round ratios:

1. projection: measure_projection (the destroyed ratio) against the head's own forward pass
   (logits + softmax) on the same tokens, for a GPT-2-sized head (V = 50,257, D = 768). The
   floor is about 2 because the projection needs one more (C, V) x (V, D) product.
2. naive: the same per-token destroyed ratios by per-token least squares and by a dense V x V
   projector, on a size where both finish. It reports the speed-up and the largest difference.
3. training, training_small: tokens/s of TinyLM with a full head against Hugging Face
   GPT2LMHeadModel with the same layers, width, heads, context and vocabulary, optimizer and
   batches, and the step time of the factorised and backward-only heads against the full head.
   training_small uses the size that notebook 04 trains in its cpu profile.
4. memory: peak resident memory of a child process that measures a V = 151,936, D = 4,096 head
   in float32, divided by the head's own size.
5. end_to_end: wall times of `make test` and `make reproduce`, timed by this module
   (--time-make) or recorded from elsewhere (--record, --reproduce-log).

    python -m gradient_bottleneck.bench [--quick] [--only projection,naive,training,memory]
    python -m gradient_bottleneck.bench --time-make test
    python -m gradient_bottleneck.bench --record make_reproduce=1234 --reproduce-log reproduce.log

Results go to results/bench.json (atomic write); end-to-end records already in the file are kept
when the benchmarks rerun, and the other way round.
"""

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import ModelConfig, TinyLM
from .paths import REPO_ROOT, resolve
from .projection import HeadProjector, measure_projection
from .results import git_commit, package_versions, replace_between_markers, write_json

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "results/bench.json"
DOCS_PAGE = REPO_ROOT / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"
BENCHMARKS = ("projection", "naive", "training", "training_small", "memory")
END_TO_END_NAMES = ("make_test", "make_reproduce", "make_smoke", "make_unit", "make_bench", "make_report")


# ---------------------------------------------------------------------------------------------
# Timing helpers


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def alternate(functions: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function once per round, in turn, after `warmup` untimed rounds.

    Alternating puts every function under the same machine load, round by round, so the ratio of
    two times in one round is meaningful even when the load changes between rounds.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            times[name].append(_timed(function))
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def machine_description() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------
# 1. Projection against the head's forward pass


def random_head_inputs(vocab_size: int, width: int, tokens: int, seed: int = 0):
    """Return hidden states H (C, D) with unit-variance entries, as after a LayerNorm, a head
    W (V, D) with std 0.02 entries (GPT-2's initialisation) and random next-token targets (C,)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=generator)
    head = torch.randn(vocab_size, width, generator=generator) * 0.02
    targets = torch.randint(0, vocab_size, (tokens,), generator=generator)
    return hidden, head, targets


def bench_projection(quick: bool) -> dict:
    vocab_size, width = 50_257, 768
    tokens = 1024 if quick else 4096
    chunk_size = 1024
    rounds = 2 if quick else 3
    hidden, head, targets = random_head_inputs(vocab_size, width, tokens)
    log.info("bench projection V=%d D=%d tokens=%d chunk_size=%d", vocab_size, width, tokens, chunk_size)

    def forward() -> None:
        """Run the head's forward pass on the same chunks: logits, then softmax."""
        with torch.no_grad():
            for start in range(0, tokens, chunk_size):
                torch.softmax(hidden[start:start + chunk_size] @ head.T, dim=-1)

    projector = HeadProjector(head)
    build_s = min(_timed(lambda: HeadProjector(head)) for _ in range(rounds))

    def measure() -> None:
        measure_projection(hidden, head, targets, chunk_size=chunk_size, projector=projector)

    times = alternate({"forward": forward, "measure": measure}, rounds)
    ratio = median_ratio(times["measure"], times["forward"])
    forward_s = statistics.median(times["forward"])
    measure_s = statistics.median(times["measure"])
    return {
        "config": {"vocab_size": vocab_size, "width": width, "tokens": tokens, "chunk_size": chunk_size,
                   "rounds": rounds, "dtype": "float32"},
        "forward_s": forward_s,
        "measure_s": measure_s,
        "projector_build_s": build_s,
        # The projector (a D x D eigendecomposition) is built once per head and reused over tokens.
        "ratio_measure_to_forward": ratio,
        "ratio_per_round": [round(m / f, 3) for m, f in zip(times["measure"], times["forward"])],
        "ratio_including_projector_build": (measure_s + build_s) / forward_s,
        "target": "ratio_measure_to_forward <= 2.5 (floor about 2)",
        "meets_target": ratio <= 2.5,
    }


# ---------------------------------------------------------------------------------------------
# 2. Against naive methods


def destroyed_by_least_squares(grad: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Per-token destroyed ratios ||g - W x*|| / ||g|| with x* = argmin_x ||W x - g||, one solve per token."""
    ratios = torch.empty(grad.shape[0], dtype=torch.float64)
    for row in range(grad.shape[0]):
        g = grad[row]
        solution = torch.linalg.lstsq(head, g[:, None]).solution
        ratios[row] = (g - (head @ solution)[:, 0]).norm() / g.norm()
    return ratios


def destroyed_by_dense_projector(grad: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Per-token destroyed ratios from the explicit V x V projector P = Q Q^T (Q from a QR of W)."""
    basis = torch.linalg.qr(head).Q  # (V, D)
    projector = basis @ basis.T  # (V, V): the dense matrix the package never forms
    residual = grad - grad @ projector
    return (residual.norm(dim=-1) / grad.norm(dim=-1)).double()


def bench_naive(quick: bool) -> dict:
    vocab_size, width = (2048, 64) if quick else (4096, 128)
    tokens = 64 if quick else 256
    rounds = 2 if quick else 3
    hidden, head, targets = random_head_inputs(vocab_size, width, tokens, seed=1)
    from .gradients import logit_gradient

    grad = logit_gradient(hidden @ head.T, targets) * tokens  # rows of the per-token loss gradient
    log.info("bench naive V=%d D=%d tokens=%d", vocab_size, width, tokens)
    results = {}

    def ours() -> None:
        results["ours"] = measure_projection(hidden, head, targets).token_destroyed().double()

    def least_squares() -> None:
        results["least_squares"] = destroyed_by_least_squares(grad, head)

    def dense() -> None:
        results["dense"] = destroyed_by_dense_projector(grad, head)

    # Ours includes building the projector, because the naive methods get no precomputation either.
    times = alternate({"ours": ours, "least_squares": least_squares, "dense": dense}, rounds)
    # float64 reference: the dense projector in double precision.
    reference = destroyed_by_dense_projector(grad.double(), head.double())
    difference = {name: float((results[name] - reference).abs().max()) for name in results}
    ours_vs = {name: float((results["ours"] - results[name]).abs().max()) for name in ("least_squares", "dense")}
    speedup_ls = median_ratio(times["least_squares"], times["ours"])
    speedup_dense = median_ratio(times["dense"], times["ours"])
    return {
        "config": {"vocab_size": vocab_size, "width": width, "tokens": tokens, "rounds": rounds, "dtype": "float32"},
        "ours_s": statistics.median(times["ours"]),
        "least_squares_s": statistics.median(times["least_squares"]),
        "dense_projector_s": statistics.median(times["dense"]),
        "speedup_vs_least_squares": speedup_ls,
        "speedup_vs_dense_projector": speedup_dense,
        "max_abs_difference_ours_vs": ours_vs,
        "max_abs_difference_vs_float64_reference": difference,
        "target": "speedup_vs_least_squares >= 20 and values equal to 1e-5",
        "meets_target": speedup_ls >= 20 and max(ours_vs.values()) <= 1e-5,
    }


# ---------------------------------------------------------------------------------------------
# 3. Training throughput against Hugging Face GPT-2


def _gpt2(config: ModelConfig):
    """GPT2LMHeadModel with TinyLM's layers, width, heads, context, vocabulary and an untied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.width,
        n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.mlp_ratio * config.width,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1,
    )
    return GPT2LMHeadModel(gpt2_config)


def _training_step_function(model, batches, loss_of):
    """Return a function that runs one AdamW step per call on the next batch of a fixed list."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    position = [0]

    def step() -> None:
        inputs, targets = batches[position[0] % len(batches)]
        position[0] += 1
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def bench_training(quick: bool) -> dict:
    """Compare training throughput at V = 8,192, D = 128, T = 128, B = 16."""
    if quick:
        return compare_training(dict(vocab_size=2048, context_length=64, width=64, n_layers=2, n_heads=4),
                                batch_size=8, steps_per_round=3, rounds=2, rank=16)
    return compare_training(dict(vocab_size=8192, context_length=128, width=128, n_layers=2, n_heads=4),
                            batch_size=16, steps_per_round=2, rounds=15, rank=32)


def bench_training_small(quick: bool) -> dict:
    """Compare training throughput at the size notebook 04 trains in its cpu profile (V = 2,048, D = 64, T = 32)."""
    return compare_training(dict(vocab_size=2048, context_length=32, width=64, n_layers=2, n_heads=4),
                            batch_size=16, steps_per_round=4 if quick else 5, rounds=2 if quick else 15, rank=16)


def compare_training(base: dict, batch_size: int, steps_per_round: int, rounds: int, rank: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        window = torch.randint(0, base["vocab_size"], (batch_size, base["context_length"] + 1), generator=generator)
        batches.append((window[:, :-1], window[:, 1:]))
    tokens_per_step = batch_size * base["context_length"]
    log.info("bench training %s batch_size=%d", base, batch_size)

    def tinylm_loss(model, inputs, targets):
        return model(inputs, targets, return_logits=False)[1]  # the trainer's call: chunked loss

    def tinylm_logits_loss(model, inputs, targets):
        return model(inputs, targets)[1]  # (B, T, V) logits, then F.cross_entropy, as for GPT-2

    def gpt2_loss(model, inputs, targets):
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    models, steps, parameters = {}, {}, {}
    variants = {"tinylm_full": ModelConfig(**base),
                "tinylm_factorised": ModelConfig(**base, head="factorised", head_rank=rank),
                "tinylm_backward_only": ModelConfig(**base, head="backward_only", head_rank=rank)}
    for name, config in variants.items():
        torch.manual_seed(0)
        models[name] = TinyLM(config)
        steps[name] = _training_step_function(models[name], batches, tinylm_loss)
    # The same full-head model trained through its logits separates the backbone's speed from the
    # chunked loss's.
    torch.manual_seed(0)
    models["tinylm_full_logits"] = TinyLM(variants["tinylm_full"])
    steps["tinylm_full_logits"] = _training_step_function(models["tinylm_full_logits"], batches, tinylm_logits_loss)
    torch.manual_seed(0)
    models["hf_gpt2"] = _gpt2(ModelConfig(**base))
    steps["hf_gpt2"] = _training_step_function(models["hf_gpt2"], batches, gpt2_loss)
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}

    def several(step):
        return lambda: [step() for _ in range(steps_per_round)]

    times = alternate({name: several(step) for name, step in steps.items()}, rounds)
    tokens_per_s = {name: steps_per_round * tokens_per_step / statistics.median(t) for name, t in times.items()}
    speedup = median_ratio(times["hf_gpt2"], times["tinylm_full"])
    return {
        "config": {**base, "batch_size": batch_size, "head_rank": rank, "steps_per_round": steps_per_round,
                   "rounds": rounds, "optimizer": "AdamW(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1), clip 1.0",
                   "hf_attention": models["hf_gpt2"].config._attn_implementation, "dtype": "float32"},
        "parameters": parameters,
        "tokens_per_s": tokens_per_s,
        "speedup_tinylm_full_vs_hf_gpt2": speedup,
        # The spread shows how much the machine's load moved the ratio from round to round.
        "speedup_per_round": [round(g / t, 3) for g, t in zip(times["hf_gpt2"], times["tinylm_full"])],
        "speedup_tinylm_full_logits_vs_hf_gpt2": median_ratio(times["hf_gpt2"], times["tinylm_full_logits"]),
        "speedup_chunked_loss_vs_logits": median_ratio(times["tinylm_full_logits"], times["tinylm_full"]),
        "slowdown_factorised_vs_full": median_ratio(times["tinylm_factorised"], times["tinylm_full"]),
        "slowdown_backward_only_vs_full": median_ratio(times["tinylm_backward_only"], times["tinylm_full"]),
        "target": "speedup_tinylm_full_vs_hf_gpt2 >= 1.2",
        "meets_target": speedup >= 1.2,
    }


# ---------------------------------------------------------------------------------------------
# 4. Peak memory while measuring a large head, in a child process


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status; the memory benchmark needs Linux")


def memory_child(vocab_size: int, width: int, tokens: int, chunk_size: int) -> dict:
    """Measure one random head in this process and return its peak resident memory (Linux only)."""
    before = _resident_bytes()
    generator = torch.Generator().manual_seed(0)
    head = torch.empty(vocab_size, width)
    for start in range(0, vocab_size, 8192):  # filled in blocks so no second full-size copy exists
        block = head[start:start + 8192]
        block.copy_(torch.randn(block.shape, generator=generator) * 0.02)
    hidden = torch.randn(tokens, width, generator=generator)
    targets = torch.randint(0, vocab_size, (tokens,), generator=generator)
    with_head = _resident_bytes()
    started = time.perf_counter()
    stats = measure_projection(hidden, head, targets, chunk_size=chunk_size)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kibibytes
    return {"head_bytes": head.numel() * head.element_size(), "rss_before_head_bytes": before,
            "rss_with_head_bytes": with_head, "peak_rss_bytes": peak, "seconds": seconds,
            "destroyed_ratio": stats.destroyed_ratio}


def bench_memory(quick: bool) -> dict:
    vocab_size, width = (151_936, 1024) if quick else (151_936, 4096)
    tokens, chunk_size = (128, 512) if quick else (512, 512)
    command = [sys.executable, "-m", "gradient_bottleneck.bench", "--memory-child",
               f"{vocab_size},{width},{tokens},{chunk_size}"]
    log.info("bench memory V=%d D=%d tokens=%d chunk_size=%d (child process)", vocab_size, width, tokens, chunk_size)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory benchmark child failed with exit code {done.returncode}: {done.stderr[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = child["peak_rss_bytes"] / child["head_bytes"]
    above_baseline = (child["peak_rss_bytes"] - child["rss_before_head_bytes"]) / child["head_bytes"]
    return {
        "config": {"vocab_size": vocab_size, "width": width, "tokens": tokens, "chunk_size": chunk_size,
                   "dtype": "float32"},
        **child,
        "ratio_peak_rss_to_head": ratio,
        # The interpreter with torch loaded takes a few hundred MB before the head exists.
        "ratio_peak_above_startup_to_head": above_baseline,
        "target": "ratio_peak_rss_to_head <= 2",
        "meets_target": ratio <= 2,
    }


# ---------------------------------------------------------------------------------------------
# 5. End-to-end wall times


def end_to_end_record(seconds: float, source: str, exit_code: int | None = None) -> dict:
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"wall time {seconds} s must be a positive number of seconds")
    record = {"seconds": round(seconds, 1), "date_utc": _now_utc(), "git": git_commit(),
              "cpu_count": os.cpu_count(), "source": source}
    if exit_code is not None:
        record["exit_code"] = exit_code
    return record


def parse_record(text: str) -> tuple[str, float]:
    """Parse NAME=SECONDS, e.g. make_test=512."""
    name, sep, value = text.partition("=")
    if not sep or name not in END_TO_END_NAMES:
        raise ValueError(f"--record {text!r} must be NAME=SECONDS with NAME one of {', '.join(END_TO_END_NAMES)}")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"--record {text!r}: {value!r} is not a number of seconds, e.g. make_test=512") from None
    return name, seconds


def seconds_from_reproduce_log(path: Path) -> float:
    """Read the total from the line `== all notebooks took N s` that `make reproduce` prints."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ValueError(f"cannot read reproduce log {path} ({exc.strerror}); pass the file `make reproduce` wrote") from exc
    matches = re.findall(r"== all notebooks took (\d+) s", text)
    if not matches:
        raise ValueError(f"{path} has no line '== all notebooks took N s'; is it the output of `make reproduce`?")
    return float(matches[-1])


def time_make(target: str) -> dict:
    """Run `make TARGET` in the repository, streaming its output, and return its wall-time record."""
    started = time.perf_counter()
    done = subprocess.run(["make", target], cwd=REPO_ROOT)
    return end_to_end_record(time.perf_counter() - started, f"make {target}", done.returncode)


# ---------------------------------------------------------------------------------------------
# Output


def load_existing(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); move it away or delete it, then rerun") from exc


def header() -> dict:
    return {"date_utc": _now_utc(), "git": git_commit(), "machine": machine_description(),
            "versions": package_versions()}


BENCHMARK_FUNCTIONS = {"projection": bench_projection, "naive": bench_naive, "training": bench_training,
                       "training_small": bench_training_small, "memory": bench_memory}


def run_benchmark_child(name: str, quick: bool) -> dict:
    """Run one benchmark in a fresh interpreter and return its result.

    Each benchmark gets its own process because an earlier one's large allocations change the
    allocator's state, probably through glibc's mmap threshold, which rises after large frees.
    training_small measured 1.11x after the other benchmarks in one process, and 1.21-1.34x alone.
    """
    command = [sys.executable, "-m", "gradient_bottleneck.bench", "--benchmark-child", name]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark {name} failed in its child process with exit code {done.returncode}: "
                           f"{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmarks(names: list[str], quick: bool) -> dict:
    results = {}
    for name in names:
        started = time.perf_counter()
        results[name] = run_benchmark_child(name, quick)
        results[name]["wall_s"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {summary_line(name, results[name])}", flush=True)
    return results


def summary_line(name: str, result: dict) -> str:
    if name == "projection":
        return (f"measure / forward = {result['ratio_measure_to_forward']:.2f} (target <= 2.5; "
                f"{result['ratio_including_projector_build']:.2f} with the projector build)")
    if name == "naive":
        return (f"{result['speedup_vs_least_squares']:.0f}x faster than per-token least squares, "
                f"{result['speedup_vs_dense_projector']:.1f}x than a dense projector (target >= 20x); "
                f"max difference {max(result['max_abs_difference_ours_vs'].values()):.1e} (target <= 1e-5)")
    if name in ("training", "training_small"):
        return (f"TinyLM / GPT2LMHeadModel tokens/s = {result['speedup_tinylm_full_vs_hf_gpt2']:.2f} (target >= 1.2; "
                f"{result['speedup_tinylm_full_logits_vs_hf_gpt2']:.2f} through the logits); "
                f"factorised head {result['slowdown_factorised_vs_full']:.2f}x, "
                f"backward-only {result['slowdown_backward_only_vs_full']:.2f}x the full head's time")
    if name == "memory":
        return (f"peak RSS / head size = {result['ratio_peak_rss_to_head']:.2f} (target <= 2; "
                f"{result['ratio_peak_above_startup_to_head']:.2f} above the interpreter's start-up)")
    return ""


def markdown_summary(payload: dict) -> str:
    """Return a Markdown table of the ratios in a bench.json payload, with date, commit and machine."""
    rows = []
    benchmarks = payload.get("benchmarks", {})
    labels = {
        "projection": ("Destroyed ratio vs the head's forward pass (V={vocab_size:,}, D={width:,})", "ratio_measure_to_forward",
                       "{:.2f}x the forward time", "<= 2.5x"),
        "naive": ("Speed-up vs per-token least squares", "speedup_vs_least_squares", "{:.0f}x faster", ">= 20x"),
        "training": ("TinyLM vs GPT2LMHeadModel training tokens/s (V={vocab_size:,}, D={width}, T={context_length}, "
                     "B={batch_size})", "speedup_tinylm_full_vs_hf_gpt2", "{:.2f}x", ">= 1.2x"),
        "training_small": ("TinyLM vs GPT2LMHeadModel training tokens/s (V={vocab_size:,}, D={width}, "
                           "T={context_length}, B={batch_size})", "speedup_tinylm_full_vs_hf_gpt2", "{:.2f}x", ">= 1.2x"),
        "memory": ("Peak RSS / head size (V={vocab_size:,}, D={width:,}, float32)", "ratio_peak_rss_to_head", "{:.2f}",
                   "<= 2"),
    }
    for name, (label, key, form, target) in labels.items():
        if name in benchmarks:
            result = benchmarks[name]
            commit = ((result.get("git") or {}).get("commit") or "unknown")[:8]
            met = "yes" if result.get("meets_target") else "no"
            label = label.format(**result["config"]) + (" (quick)" if result.get("quick") else "")
            rows.append(f"| {label} | {form.format(result[key])} | {target} | {met} | {result.get('date_utc', '?')[:10]}, {commit} |")
    if "naive" in benchmarks:
        result = benchmarks["naive"]
        rows.append(f"| Speed-up vs a dense V x V projector | {result['speedup_vs_dense_projector']:.1f}x faster | - | - | "
                    f"{result.get('date_utc', '?')[:10]}, {((result.get('git') or {}).get('commit') or 'unknown')[:8]} |")
        rows.append(f"| Largest per-token difference vs both naive methods | "
                    f"{max(result['max_abs_difference_ours_vs'].values()):.1e} | <= 1e-5 | "
                    f"{'yes' if max(result['max_abs_difference_ours_vs'].values()) <= 1e-5 else 'no'} | |")
    for name in ("training", "training_small"):
        if name in benchmarks:
            result, config = benchmarks[name], benchmarks[name]["config"]
            size = f"V={config['vocab_size']:,}, D={config['width']}"
            rows.append(f"| TinyLM through its logits and F.cross_entropy vs GPT2LMHeadModel tokens/s ({size}) | "
                        f"{result['speedup_tinylm_full_logits_vs_hf_gpt2']:.2f}x | - | - | |")
            rows.append(f"| Factorised head (r={config['head_rank']}) step time / full head ({size}) | "
                        f"{result['slowdown_factorised_vs_full']:.2f}x | - | - | |")
            rows.append(f"| Backward-only head (r={config['head_rank']}) step time / full head ({size}) | "
                        f"{result['slowdown_backward_only_vs_full']:.2f}x | - | - | |")
    for name, record in payload.get("end_to_end", {}).items():
        commit = ((record.get("git") or {}).get("commit") or "unknown")[:8]
        rows.append(f"| `make {name.removeprefix('make_')}` wall time | {record['seconds'] / 60:.1f} min | - | - | "
                    f"{record['date_utc'][:10]}, {commit} |")
    machine = payload.get("machine", {})
    header_lines = [
        f"Measured by `python -m gradient_bottleneck.bench` on {machine.get('cpu_count', '?')} cores "
        f"({machine.get('cpu_model', machine.get('processor', 'unknown CPU'))}), torch "
        f"{payload.get('versions', {}).get('torch', '?')}, 1-minute load average "
        f"{machine.get('load_average_1min_at_start', '?')} at the start.",
        "",
        "| Benchmark | Measured | Target | Met | Date, commit |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header_lines + rows) + "\n"


def update_docs_page(table: str, page: Path = DOCS_PAGE) -> None:
    """Replace the text between the bench-summary markers of the benchmarks page."""
    replace_between_markers(page, START_MARK, END_MARK, table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gradient_bottleneck.bench",
                                     description="Benchmarks as side-by-side ratios; writes results/bench.json.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds, to check that every benchmark runs")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"results file (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--time-make", metavar="TARGET", action="append", default=[],
                        help="run `make TARGET` (test or reproduce), record its wall time and run no benchmark")
    parser.add_argument("--record", metavar="NAME=SECONDS", action="append", default=[],
                        help="record a wall time measured elsewhere, e.g. make_test=512; runs no benchmark")
    parser.add_argument("--reproduce-log", metavar="FILE",
                        help="record make_reproduce from the '== all notebooks took N s' line of its output")
    parser.add_argument("--summary", action="store_true",
                        help="print a Markdown table of the ratios in the results file and run nothing")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"with --summary, also replace the table in {DOCS_PAGE.relative_to(REPO_ROOT)}")
    parser.add_argument("--memory-child", metavar="V,D,TOKENS,CHUNK", help=argparse.SUPPRESS)
    parser.add_argument("--benchmark-child", choices=BENCHMARKS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.memory_child:
        vocab_size, width, tokens, chunk_size = (int(x) for x in args.memory_child.split(","))
        print(json.dumps(memory_child(vocab_size, width, tokens, chunk_size)))
        return 0
    if args.benchmark_child:
        print(json.dumps(BENCHMARK_FUNCTIONS[args.benchmark_child](args.quick)))
        return 0
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    output = resolve(args.output)
    if output.exists() and output.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file path such as {DEFAULT_OUTPUT}")
    existing = load_existing(output)
    if args.summary:
        if not existing:
            raise ValueError(f"{output} not found; run `make bench` first")
        table = markdown_summary(existing)
        print(table, end="")
        if args.update_docs:
            update_docs_page(table)
            print(f"updated {DOCS_PAGE}")
        return 0
    end_to_end = dict(existing.get("end_to_end", {}))

    # Parse every recorded time before anything runs, so a typo fails fast.
    records = [parse_record(text) for text in args.record]
    for target in args.time_make:
        if f"make_{target}" not in END_TO_END_NAMES:
            raise ValueError(f"--time-make {target!r} is not a timed target; use one of "
                             f"{', '.join(n.removeprefix('make_') for n in END_TO_END_NAMES)}")
    if args.reproduce_log:
        records.append(("make_reproduce", seconds_from_reproduce_log(Path(args.reproduce_log))))

    if records or args.time_make:
        for name, seconds in records:
            end_to_end[name] = end_to_end_record(seconds, "recorded")
        exit_codes = []
        for target in args.time_make:
            end_to_end[f"make_{target}"] = record = time_make(target)
            exit_codes.append(record["exit_code"])
        write_json(output, {**existing, "end_to_end": end_to_end})
        for name, record in end_to_end.items():
            print(f"{name}: {record['seconds']:.0f} s on {record['date_utc']} at {(record['git']['commit'] or '?')[:8]}")
        print(f"written {output}")
        return max(exit_codes, default=0)

    names = list(BENCHMARKS)
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown or not names:
            raise ValueError(f"--only {args.only!r} names unknown benchmarks {unknown}; use some of {','.join(BENCHMARKS)}")
    info = header()
    print(f"benchmarks {','.join(names)}{' (quick)' if args.quick else ''}: torch {torch.__version__}, "
          f"{info['machine']['cpu_count']} cores ({torch.get_num_threads()} torch threads), "
          f"load average {info['machine']['load_average_1min_at_start']}, commit "
          f"{(info['git']['commit'] or 'unknown')[:8]}{' (dirty)' if info['git']['dirty'] else ''}", flush=True)
    results = run_benchmarks(names, args.quick)
    # Benchmarks not rerun this time keep their previous values, marked with their own date.
    previous = existing.get("benchmarks", {})
    not_rerun = {name: value for name, value in previous.items() if name not in results}
    stamp = {"date_utc": info["date_utc"], "git": info["git"], "quick": args.quick}
    results = {**not_rerun, **{name: {**value, **stamp} for name, value in results.items()}}
    payload = {**info, "quick": args.quick, "benchmarks": results, "end_to_end": end_to_end}
    write_json(output, payload)
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
