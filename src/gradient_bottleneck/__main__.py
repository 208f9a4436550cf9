"""Command line: `python -m gradient_bottleneck COMMAND --help`."""

import argparse
import importlib.util
import logging
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from . import claims, pretrained
from .paths import CORPUS_DIR

# Optional components reported by `env`: (import name, distribution name, what it enables).
OPTIONAL_COMPONENTS = (
    ("transformers", "transformers", "measure Hugging Face causal LMs (measure)"),
    ("safetensors", "safetensors", "load .safetensors checkpoints"),
    ("accelerate", "accelerate", "device_map loading of models larger than one device"),
    ("datasets", "datasets", "stream Hugging Face datasets as text"),
    ("pyarrow", "pyarrow", "read .parquet text files"),
    ("psutil", "psutil", "memory figures in benchmarks"),
    ("papermill", "papermill", "execute notebooks with a profile (make reproduce)"),
    ("nbval", "nbval", "validate notebooks under pytest (make smoke)"),
)


def cmd_claims(args: argparse.Namespace) -> int:
    rows = claims.collect_verdicts(args.profile)
    table = claims.markdown_table(rows)
    print(table, end="")
    if args.update_readme:
        claims.update_readme(table)
        print(f"README.md claims table updated from results/{args.profile}/ ({len(rows)} rows)")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    # Imported here because transformers takes seconds to import and `claims` does not need it.
    import transformers

    from .results import provenance, write_json

    if args.tokens < 1:
        raise ValueError(f"--tokens {args.tokens} must be >= 1")
    if not args.verbose:
        transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    loaded = pretrained.load_causal_lm(args.model, allow_download=args.allow_download, dtype=args.dtype,
                                       device=args.device, tokenizer=args.tokenizer,
                                       context_length=args.context_length)
    measurement = pretrained.measure_model(loaded, args.text, max_tokens=args.tokens, batch_size=args.batch_size,
                                           chunk_size=args.chunk_size, progress=not args.no_progress,
                                           allow_download=args.allow_download, text_field=args.text_field)
    summary = measurement.summary()
    summary["seconds_total"] = time.perf_counter() - started

    head = "tied" if summary["tied"] else "untied"
    extras = [f"{head} head"]
    if summary["head_bias"]:
        extras.append("bias")
    if summary["logit_scale"] != 1.0:
        extras.append(f"logit scale {summary['logit_scale']:g}")
    if summary["logit_softcap"] is not None:
        extras.append(f"soft-cap {summary['logit_softcap']:g}")
    rows = [
        ("model", f"{args.model} ({summary['architecture']}, V={summary['vocab_size']:,}, "
                  f"D={summary['hidden_size']:,}, {', '.join(extras)}, {summary['dtype']} on {summary['device']})"),
        ("tokens", f"{summary['tokens']:,} in {summary['windows']:,} window(s) of at most "
                   f"{summary['context_length']:,} from "
                   f"{summary['documents'] if summary['documents'] is not None else 'streamed'} document(s) in {args.text}"),
        ("destroyed ratio", f"{summary['destroyed_ratio']:.5f}  (per-token mean {summary['destroyed_ratio_token_mean']:.5f}, "
                            f"5-95%: {summary['destroyed_ratio_token_p05']:.4f}-{summary['destroyed_ratio_token_p95']:.4f})"),
        ("visible cosine", f"{summary['visible_cosine']:.5f}"),
        ("random baseline", f"{summary['random_baseline']:.5f}  (sqrt(1 - D/V), a direction random w.r.t. the head)"),
        ("loss", f"{summary['loss']:.4f} nats/token"),
        ("time", f"{summary['seconds']:.1f} s measuring, {summary['seconds_total']:.1f} s in total"),
    ]
    if args.output:
        parameters = {key: (str(value) if isinstance(value, Path) else value)
                      for key, value in vars(args).items() if key != "handler"}
        path = write_json(args.output, {"measurement": summary,
                                        "provenance": provenance(parameters, seed=0, device=loaded.device)})
        rows.append(("results", str(path)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _component_status(module: str, distribution: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "missing"
    try:
        return f"available ({metadata.version(distribution)})"
    except metadata.PackageNotFoundError:
        return "available"


def cmd_env(args: argparse.Namespace) -> int:
    import torch

    from . import __version__

    rows = [
        ("gradient_bottleneck", __version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("cpu cores", f"{os.cpu_count()} (torch uses {torch.get_num_threads()} threads)"),
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("device", f"cuda ({torch.cuda.device_count()}: {names}), CUDA {torch.version.cuda}"))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        rows.append(("device", "mps (Apple GPU)"))
    else:
        rows.append(("device", "cpu (no CUDA or MPS device found)"))
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    rows.append(("hub access", "offline (HF_HUB_OFFLINE is set)" if offline
                 else "allowed only with --allow-download (HF_HUB_OFFLINE is unset)"))
    rows.append(("hub cache", os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME")
                 or str(Path.home() / ".cache" / "huggingface")))
    for module, distribution, purpose in OPTIONAL_COMPONENTS:
        rows.append((module, f"{_component_status(module, distribution)}: {purpose}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gradient_bottleneck",
                                     description="Companion to 'Lost in Backpropagation' (arXiv:2603.10145).")
    commands = parser.add_subparsers(dest="command", required=True)

    table = commands.add_parser("claims", help="print the claims table built from results/<profile>/*.json")
    table.add_argument("--profile", default="cpu", help="results profile to read: smoke, cpu or gpu (default: cpu)")
    table.add_argument("--update-readme", action="store_true", help="also rewrite the table inside README.md")
    table.set_defaults(handler=cmd_claims)

    measure = commands.add_parser(
        "measure", help="measure the destroyed ratio of a Hugging Face causal LM on a text",
        description="Measure how much of the logit gradient a causal LM's head destroys: the destroyed ratio "
                    "||G - G Q Q^T||_F / ||G||_F and the visible cosine over next-token targets of a text, "
                    "with G the gradient at the head's linear output and Q an orthonormal basis of col(W). "
                    "Runs offline unless --allow-download is given; never runs code shipped with a model.",
        epilog="Supported: decoder-only causal LMs of transformers whose head is one linear map W (V, D), "
               "tied or not, with or without a bias, with a constant logit scale or tanh soft-capping.\n"
               "Not supported:\n" + pretrained.unsupported_summary(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    measure.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                         help="folder written by save_pretrained, or a hub id such as gpt2 (read from the local "
                              "Hugging Face cache unless --allow-download)")
    measure.add_argument("--text", default=str(CORPUS_DIR / "heldout"), metavar="FILE_OR_DIR",
                         help="UTF-8 text file, folder whose *.txt files are one document each, .jsonl or .parquet "
                              "file (one document per row), or hf:NAME[:CONFIG] for a Hugging Face dataset (needs "
                              "--allow-download and the datasets package) (default: the shipped held-out corpus, "
                              "data/corpus/heldout)")
    measure.add_argument("--text-field", default="text", metavar="FIELD",
                         help="field holding the text in .jsonl, .parquet and hf: sources (default: text)")
    measure.add_argument("--tokens", type=int, default=4096, metavar="N",
                         help="number of next-token targets to measure, spread evenly over the documents "
                              "(default: 4096)")
    measure.add_argument("--output", metavar="FILE.json",
                         help="write the measurement and its provenance (commit, versions, device, options) as JSON")
    measure.add_argument("--allow-download", action="store_true",
                         help="allow downloading the model and tokenizer from the Hugging Face hub "
                              "(off by default; HF_HUB_OFFLINE=1 still blocks it)")
    measure.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                         help="tokenizer folder or hub id, when the model folder has none (default: the model's)")
    measure.add_argument("--context-length", type=int, metavar="T",
                         help="window length in tokens fed to the model (default: min(1024, the model's limit))")
    measure.add_argument("--batch-size", type=int, default=4, metavar="B",
                         help="windows per forward pass (default: 4)")
    measure.add_argument("--chunk-size", type=int, default=512, metavar="C",
                         help="tokens per projection chunk; memory grows by about C x V x 12 bytes (default: 512)")
    measure.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                         help="dtype of the model's weights; auto keeps the checkpoint's. The projection always "
                              "runs in float32 (default: auto)")
    measure.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto picks CUDA when available "
                                                          "(default: auto)")
    measure.add_argument("--no-progress", action="store_true", help="hide the progress bar (also hidden when CI is set)")
    measure.add_argument("--verbose", action="store_true", help="show transformers' warnings and INFO logs")
    measure.set_defaults(handler=cmd_measure)

    env = commands.add_parser("env", help="print versions, the device and which optional components are installed")
    env.set_defaults(handler=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        logging.getLogger("gradient_bottleneck").setLevel(logging.INFO)
    try:
        return args.handler(args)
    except (ValueError, OSError, RuntimeError, ImportError, KeyError, MemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
