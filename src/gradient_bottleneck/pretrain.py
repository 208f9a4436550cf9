"""Pretrain a TinyLM from the command line, in one process or under torchrun.

    python -m gradient_bottleneck.pretrain --run-dir runs/r32 --head factorised --head_rank 32
    torchrun --nproc_per_node=8 -m gradient_bottleneck.pretrain --config my_run.yaml \
        --run-dir runs/r32 --parallel ddp

Every ModelConfig and TrainConfig field is a flag of the same name (see --help). --config reads
a YAML file of those names (plus the data flags, with dashes or underscores); flags on the command
line override it. The corpus is the shipped one by default; --corpus points at the user's files or,
with --allow-download, a Hugging Face dataset. Relaunching the same command after a crash resumes
from RUN_DIR/last.pt. Rank 0 prints one JSON line summarising the run.
"""

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from . import distributed
from .external_corpus import DEFAULT_HF_DATASET, load_corpus, prepare_corpus
from .model import ModelConfig
from .paths import CACHE_DIR
from .tokenizer import encode_split
from .train import TrainConfig, train

log = logging.getLogger("gradient_bottleneck.pretrain")

def _field_type(field: dataclasses.Field):
    if field.type in (int, "int"):
        return int
    if field.type in (float, "float"):
        return float
    if field.type in ("int | None",) or field.name == "head_rank":
        return int
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gradient_bottleneck.pretrain",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of flag values; command-line flags override it")
    parser.add_argument("--run-dir", required=True, help="checkpoints and history; relaunching resumes from here")
    data = parser.add_argument_group("data")
    data.add_argument("--corpus", default="shipped",
                      help=f"'shipped', a file or folder of .txt/.jsonl/.parquet, or hf:NAME[:CONFIG] "
                           f"(e.g. {DEFAULT_HF_DATASET}, needs --allow-download)")
    data.add_argument("--tokenizer", default="bpe",
                      help="'bpe' trains a byte-level BPE of --vocab-size tokens; or a local tokenizer.json")
    data.add_argument("--vocab-size", type=int, default=4096, help="V for a trained BPE tokenizer")
    data.add_argument("--data-dir", default=None, help="where an external corpus is encoded (default RUN_DIR/../data)")
    data.add_argument("--text-field", default="text", help="JSON field or parquet column holding the text")
    data.add_argument("--heldout-fraction", type=float, default=0.01, help="share of documents held out")
    data.add_argument("--allow-download", action="store_true", help="allow reading hf: datasets from the hub")
    data.add_argument("--max-documents", type=int, default=None, help="read at most this many documents")
    model = parser.add_argument_group("model (ModelConfig)")
    for field in dataclasses.fields(ModelConfig):
        if field.name != "vocab_size":
            model.add_argument(f"--{field.name}", type=_field_type(field), default=None,
                               help=f"default {field.default!r}")
    training = parser.add_argument_group("training (TrainConfig)")
    for field in dataclasses.fields(TrainConfig):
        if field.type in (bool, "bool"):
            training.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=None,
                                  help=f"default {field.default!r}")
        else:
            training.add_argument(f"--{field.name}", type=_field_type(field), default=None,
                                  help=f"default {field.default!r}")
    data.add_argument("--prepare-only", action="store_true",
                      help="encode the corpus into --data-dir and exit (e.g. for notebook 04's corpus parameter)")
    testing = parser.add_argument_group("testing")
    testing.add_argument("--stop-after-step", type=int, default=None,
                         help="save the full state after this step and exit, as if interrupted")
    testing.add_argument("--write-rank-weights", action="store_true",
                         help="every rank saves its final weights to RUN_DIR/rank<N>_weights.pt")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def _apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill flags left at their defaults from the YAML file named by --config."""
    if not args.config:
        return
    values = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
    known = {action.dest for action in parser._actions}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise ValueError(f"{args.config}: unknown key {key!r}; run with --help for the accepted names")
        if getattr(args, dest) in (None, parser.get_default(dest)):
            setattr(args, dest, value)


def load_streams(args: argparse.Namespace, group: distributed.ProcessGroupInfo):
    """Encode (on rank 0) and load the corpus; every rank reads the same files."""
    if args.corpus == "shipped":
        if args.tokenizer != "bpe":
            raise ValueError("the shipped corpus uses the package's BPE tokenizer; pass --tokenizer bpe")
        if group.rank == 0:
            encode_split("train", args.vocab_size), encode_split("heldout", args.vocab_size)
        distributed.barrier(group)
        return encode_split("train", args.vocab_size), encode_split("heldout", args.vocab_size)
    spec = f"bpe:{args.vocab_size}" if args.tokenizer == "bpe" else args.tokenizer
    data_dir = Path(args.data_dir) if args.data_dir else Path(args.run_dir).parent / "data"
    if group.rank == 0:
        prepare_corpus(args.corpus, spec, data_dir, args.heldout_fraction, args.text_field,
                       args.allow_download, args.max_documents)
    distributed.barrier(group)
    return load_corpus(data_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_config_file(args, parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    group = distributed.init_from_env(args.device or "auto")
    try:
        if group.world_size > 1 and (args.parallel or "none") == "none":
            raise ValueError(f"torchrun started {group.world_size} processes; pass --parallel ddp or --parallel fsdp")
        if args.parallel == "fsdp" and not group.device.startswith("cuda"):
            # torch.distributed.fsdp.FullyShardedDataParallel raises without an accelerator.
            raise ValueError(f"--parallel fsdp needs GPUs, but this process runs on {group.device}; "
                             "use --parallel ddp on CPUs")
        train_stream, heldout_stream = load_streams(args, group)
        if args.prepare_only:
            if group.rank == 0:
                print(json.dumps({"train_tokens": len(train_stream.tokens), "heldout_tokens": len(heldout_stream.tokens),
                                  "vocab_size": train_stream.vocab_size}), flush=True)
            return 0
        model_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)
                        if f.name != "vocab_size" and getattr(args, f.name) is not None}
        train_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                        if getattr(args, f.name) is not None}
        train_kwargs["device"] = group.device if group.initialised else train_kwargs.get("device", "auto")
        model_config = ModelConfig(vocab_size=train_stream.vocab_size, **model_kwargs)
        train_config = TrainConfig(**train_kwargs)
        result = train(model_config, train_config, train_stream, heldout_stream, args.run_dir,
                       desc=f"pretrain {model_config.head}", stop_after_step=args.stop_after_step)
        if args.write_rank_weights:
            torch.save(result.model.state_dict(), Path(args.run_dir) / f"rank{group.rank}_weights.pt")
        if group.rank == 0:
            last = result.history[-1] if result.history else {}
            steps_run = (result.stopped_at_step or train_config.steps) - result.resumed_from_step
            tokens_run = steps_run * train_config.batch_size * model_config.context_length \
                * train_config.grad_accum_steps * group.world_size
            print(json.dumps({
                "run_dir": str(args.run_dir), "parameters": result.model.num_parameters(),
                "resumed_from_step": result.resumed_from_step, "stopped_at_step": result.stopped_at_step,
                "step": last.get("step"), "tokens_seen": last.get("tokens_seen"),
                "heldout_loss": last.get("heldout_loss"), "heldout_accuracy": last.get("heldout_accuracy"),
                "world_size": group.world_size, "wall_time_s": round(result.wall_time_s, 3),
                "tokens_per_s": round(tokens_run / result.wall_time_s, 1) if result.wall_time_s > 0 else None,
            }), flush=True)
    finally:
        distributed.shutdown(group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
