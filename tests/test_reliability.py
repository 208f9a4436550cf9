"""Bad inputs give one clear error that names the value and the fix, and leave earlier results intact.

Cases that other test files cover are not repeated here. test_model.py covers model sizes and
ranks, and test_train.py covers train-config values, NaN loss and damaged checkpoint bytes.
test_tokenizer.py covers tokenizer sizes, an unreadable tokenizer cache and a missing or empty
corpus. test_results.py covers an unwritable folder, and test_profiles.py an unknown profile.
"""

import errno
import json
import os
import re
from pathlib import Path

import nbformat
import papermill
import pytest
import torch

import gradient_bottleneck.model
from gradient_bottleneck import bench, claims, report, results
from gradient_bottleneck.__main__ import main as cli_main
from gradient_bottleneck.corpus import load_documents
from gradient_bottleneck.model import ModelConfig
from gradient_bottleneck.paths import REPO_ROOT
from gradient_bottleneck.tokenizer import TokenStream, encode_split, load_tokenizer
from gradient_bottleneck.train import TrainConfig, model_from_checkpoint, train

NOTEBOOKS = {path.stem: path for path in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}


def earlier_results(folder: Path, stem: str) -> dict[Path, bytes]:
    """Write a results JSON and a figure as an earlier run would have; return their bytes."""
    files = {folder / f"{stem}.json": json.dumps({"values": {"earlier": 1.0}}).encode(),
             folder / "figures" / f"{stem[:2]}_earlier.png": b"\x89PNG earlier figure"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def assert_unchanged(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} changed"
    for folder in {path.parent for path in files}:
        assert not list(folder.glob("*.tmp")), f"temporary file left in {folder}"
        assert not list(folder.glob(".*.tmp")), f"temporary file left in {folder}"


# ---------------------------------------------------------------------------------------------
# Notebook parameters, checked by the notebooks' own set-up cells run in this process


def run_setup_cells(notebook: Path, overrides: dict, output_dir: Path, max_cells: int = 2) -> None:
    """Execute the parameters cell with `overrides`, then up to `max_cells` following code cells.

    This is the code papermill would run first, without starting a kernel.
    """
    cells = [cell for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"]
    start = next(i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", []))
    namespace: dict = {}
    exec(compile(cells[start].source, f"{notebook.name}:parameters", "exec"), namespace)
    namespace.update(overrides, output_dir=str(output_dir))
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        for index, cell in enumerate(cells[start + 1:start + 1 + max_cells], start + 1):
            exec(compile(cell.source, f"{notebook.name}:cell{index}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


# (notebook, bad parameters, exception, message naming the value and the fix)
NOTEBOOK_CASES = [
    *[(stem, {"profile": "fast"}, ValueError, r"unknown profile 'fast'; use one of smoke, cpu, gpu") for stem in NOTEBOOKS],
    ("01_vocabulary_gradients", {"token_counts": [64, 32]}, ValueError, r"token_counts=\[64, 32\] must be strictly increasing"),
    ("01_vocabulary_gradients", {"token_counts": [1, 8]}, ValueError, r"token_counts=\[1, 8\] .* every entry >= 2"),
    ("01_vocabulary_gradients", {"step_tokens": 1}, ValueError, r"step_tokens=1 must be >= 2"),
    ("01_vocabulary_gradients", {"step_size": 0.0}, ValueError, r"step_size=0.0 must be > 0"),
    ("01_vocabulary_gradients", {"width": 6}, ValueError, r"n_heads=4 must be >= 1 and divide the width D=6"),
    ("01_vocabulary_gradients", {"train_steps": 0}, ValueError, r"steps=0 must be an integer >= 1"),
    ("01_vocabulary_gradients", {"vocab_size": 100}, ValueError, r"V=100 must be an integer >= 257"),
    ("02_projection_loss", {"checkpoint_width": 48}, ValueError, r"checkpoint_width=48 must be one of widths"),
    ("02_projection_loss", {"widths": [32, 64, 8192]}, ValueError, r"every width must be below V=8192"),
    ("02_projection_loss", {"step_sizes": [0.1, -1.0]}, ValueError, r"step_sizes=\[0.1, -1.0\] must all be > 0"),
    ("03_underfitting_spamlang", {"learning_rates": [0.01]}, ValueError, r"learning_rates=\[0.01\] has fewer than 3"),
    ("03_underfitting_spamlang", {"widths": [7]}, ValueError, r"width D=7 is not divisible by n_heads=2"),
    ("04_training_comparison", {"factorised_ranks": [0, 4]}, ValueError, r"factorised_ranks=\[0, 4\] must be"),
    ("04_training_comparison", {"seeds": [0]}, ValueError, r"seeds=\[0\] must hold at least 2 distinct seeds"),
    ("05_pretrained_models", {"spectrum_model": "missing"}, ValueError, r"spectrum_model='missing' must be one of"),
    ("05_pretrained_models", {"dtype": "int8"}, ValueError, r"dtype='int8' must be auto"),
]


@pytest.mark.parametrize(("stem", "overrides", "error", "message"), NOTEBOOK_CASES,
                         ids=[f"{c[0][:2]}-{'-'.join(map(str, c[1]))}" for c in NOTEBOOK_CASES])
def test_notebook_rejects_bad_parameter(tmp_path, stem, overrides, error, message):
    if stem not in NOTEBOOKS:
        pytest.skip(f"notebooks/{stem}.ipynb is not in this checkout")
    files = earlier_results(tmp_path, stem)
    with pytest.raises(error, match=message):
        run_setup_cells(NOTEBOOKS[stem], overrides, tmp_path)
    assert_unchanged(files)


def test_papermill_run_with_bad_parameter_keeps_results(tmp_path):
    """The same failure through papermill and a kernel, as `make reproduce` runs it."""
    stem = "01_vocabulary_gradients"
    files = earlier_results(tmp_path / "results", stem)
    with pytest.raises(papermill.PapermillExecutionError, match="unknown profile 'fast'"):
        papermill.execute_notebook(str(NOTEBOOKS[stem]), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   parameters={"profile": "fast", "output_dir": str(tmp_path / "results")},
                                   progress_bar=False, log_output=False)
    assert_unchanged(files)


# ---------------------------------------------------------------------------------------------
# The trainer


MODEL = ModelConfig(vocab_size=50, context_length=8, width=8, n_layers=1, n_heads=1)
QUICK = TrainConfig(steps=4, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1, device="cpu")


def token_streams(train_tokens: int = 500, heldout_tokens: int = 100) -> tuple[TokenStream, TokenStream]:
    tokens = torch.randint(0, 50, (train_tokens + heldout_tokens,), generator=torch.Generator().manual_seed(0))
    return (TokenStream(tokens[:train_tokens], torch.tensor([0]), ("train",), 50),
            TokenStream(tokens[train_tokens:], torch.tensor([0]), ("heldout",), 50))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, r"batch_size=0 must be an integer >= 1"),
    ({"eval_every": 0}, r"eval_every=0 must be an integer >= 1"),
    ({"grad_accum_steps": 0}, r"grad_accum_steps=0 must be an integer >= 1"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio=1.5 must lie in \[0, 1\]"),
    ({"precision": "fp16"}, r"precision='fp16' must be one of \('fp32', 'bf16'\)"),
    ({"parallel": "horovod"}, r"parallel='horovod' must be one of"),
])
def test_train_config_rejects_more_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_raises():
    with pytest.raises(RuntimeError, match="device='cuda' requested but CUDA is not available; use device='auto'"):
        train(MODEL, TrainConfig(**{**QUICK.__dict__, "device": "cuda"}), *token_streams())


def test_too_short_streams_raise():
    with pytest.raises(ValueError, match="held-out stream of 5 tokens is too short for context_length=8"):
        train(MODEL, QUICK, *token_streams(heldout_tokens=5))
    with pytest.raises(ValueError, match="token stream of 6 tokens is too short for context_length=8"):
        train(MODEL, QUICK, *token_streams(train_tokens=6))


def test_parallel_without_process_group_raises():
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group; launch with torchrun"):
        train(MODEL, TrainConfig(**{**QUICK.__dict__, "parallel": "ddp"}), *token_streams())


def test_nan_loss_keeps_last_checkpoint(tmp_path, monkeypatch):
    streams = token_streams()
    train(MODEL, QUICK, *streams, run_dir=tmp_path, stop_after_step=2)
    files = {path: path.read_bytes() for path in tmp_path.rglob("*.pt")}

    def nan_loss(hidden, weight, targets, *args, **kwargs):
        return (hidden.sum() + weight.sum()) * float("nan")

    # the trainer's loss: TinyLM.forward(..., return_logits=False) calls the chunked cross-entropy
    monkeypatch.setattr(gradient_bottleneck.model, "chunked_cross_entropy", nan_loss)
    with pytest.raises(FloatingPointError, match="training loss became nan at step 2 .*lower the learning rate"):
        train(MODEL, QUICK, *streams, run_dir=tmp_path)
    assert_unchanged(files)


def test_corrupted_last_checkpoint_stops_resume(tmp_path):
    streams = token_streams()
    train(MODEL, QUICK, *streams, run_dir=tmp_path, stop_after_step=2)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut off half-way
    files = {path: path.read_bytes() for path in tmp_path.rglob("*.pt")}
    with pytest.raises(RuntimeError, match=f"checkpoint {re.escape(str(last))} is corrupted or truncated.*delete it"):
        train(MODEL, QUICK, *streams, run_dir=tmp_path)
    assert_unchanged(files)


def test_truncated_snapshot_names_the_file(tmp_path):
    train(MODEL, QUICK, *token_streams(), run_dir=tmp_path)
    snapshot = tmp_path / "checkpoints" / "step_000004.pt"
    snapshot.write_bytes(snapshot.read_bytes()[:-200])
    with pytest.raises(RuntimeError, match=f"checkpoint {re.escape(str(snapshot))} is corrupted or truncated"):
        model_from_checkpoint(snapshot)


def test_tensor_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} .*model_config"):
        model_from_checkpoint(path)


def test_run_dir_that_is_a_file_raises(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_bytes(b"earlier file")
    with pytest.raises(OSError, match="cannot write to .*run.*choose a writable output folder"):
        train(MODEL, QUICK, *token_streams(), run_dir=blocker)
    assert blocker.read_bytes() == b"earlier file"


# ---------------------------------------------------------------------------------------------
# The loader


def test_unreadable_token_cache_raises(small_corpus, tmp_path):
    encode_split("heldout", 300, small_corpus, tmp_path)
    [ids] = (tmp_path / "tokens").glob("*/heldout.npy")
    ids.write_bytes(b"\x93NUMPY truncated")
    with pytest.raises(RuntimeError, match=r"token cache .* is unreadable .*delete that folder to re-encode"):
        encode_split("heldout", 300, small_corpus, tmp_path)


def test_tokenizer_cache_of_other_size_raises(small_corpus, tmp_path):
    load_tokenizer(300, small_corpus, tmp_path)
    [cached] = (tmp_path / "tokenizers").glob("*-V300.json")
    other = load_tokenizer(301, small_corpus, tmp_path)
    [cached_301] = (tmp_path / "tokenizers").glob("*-V301.json")
    cached_301.write_bytes(cached.read_bytes())  # a V=300 tokenizer under the V=301 name
    assert other.get_vocab_size() == 301
    with pytest.raises(RuntimeError, match=r"has V=300, expected 301; delete that file to retrain it"):
        load_tokenizer(301, small_corpus, tmp_path)


def test_missing_heldout_split_raises(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("some text\n")
    with pytest.raises(FileNotFoundError, match=r"corpus folder .*heldout is missing; restore data/corpus"):
        load_documents("heldout", tmp_path)


def test_non_utf8_document_names_the_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt .*UTF-8"):
        load_documents("train", tmp_path)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_unknown_profile(capsys):
    assert cli_main(["claims", "--profile", "fast"]) == 2
    assert "error: unknown profile 'fast'; use one of smoke, cpu, gpu" in capsys.readouterr().err


def test_cli_measure_rejects_zero_tokens(capsys):
    assert cli_main(["measure", "--model", "gpt2", "--tokens", "0"]) == 2
    assert "--tokens 0 must be >= 1" in capsys.readouterr().err


def test_cli_measure_missing_model_folder(capsys, tmp_path):
    missing = tmp_path / "no_such_model"
    assert cli_main(["measure", "--model", str(missing), "--tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert f"model directory {missing} not found" in err
    assert "save_pretrained" in err


def test_cli_measure_hub_id_while_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    assert cli_main(["measure", "--model", "example-org/not-cached-model", "--tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err
    assert "--allow-download" in err


def test_cli_measure_rejects_model_that_is_not_causal(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(folder)
    output = tmp_path / "measure.json"
    output.write_text("earlier")
    assert cli_main(["measure", "--model", str(folder), "--tokens", "8", "--output", str(output)]) == 2
    assert "BertModel'], which is not a causal LM" in capsys.readouterr().err
    assert output.read_text() == "earlier"


def test_cli_measure_folder_without_weights(capsys, tmp_path):
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert cli_main(["measure", "--model", str(folder), "--tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "not a local directory" not in err
    assert "model.safetensors" in err


# ---------------------------------------------------------------------------------------------
# Results, the claims table, the report and the benchmarks


def test_full_disk_keeps_previous_results(tmp_path, monkeypatch):
    path = results.write_json(tmp_path / "01_demo.json", {"values": {"earlier": 1}})
    files = {path: path.read_bytes()}

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    recorder = results.ResultsRecorder(path, parameters={}, seed=0, device="cpu")
    recorder.record(later=2)
    with pytest.raises(OSError, match="No space left on device"):
        recorder.write()
    assert_unchanged(files)


def test_damaged_results_json_names_the_file(tmp_path):
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "01_demo.json").write_text("{ truncated")
    with pytest.raises(ValueError, match=r"01_demo.json"):
        claims.collect_verdicts("smoke", tmp_path)


def test_report_needs_results(tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        report.build_report("fast", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"results folder .*smoke not found; run `make reproduce PROFILE=smoke`"):
        report.build_report("smoke", tmp_path, tmp_path / "out")
    (tmp_path / "smoke").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no NN_name.ipynb or NN_name.json"):
        report.build_report("smoke", tmp_path, tmp_path / "out")


def test_report_into_a_file_raises(tmp_path):
    earlier_results(tmp_path / "smoke", "01_demo")
    blocker = tmp_path / "out"
    blocker.write_text("earlier")
    with pytest.raises(OSError, match=r"cannot create report folder .*out/smoke.*writable --output-dir"):
        report.build_report("smoke", tmp_path, blocker)
    assert blocker.read_text() == "earlier"


@pytest.mark.parametrize(("argv", "message"), [
    (["--record", "make_test"], r"--record 'make_test' must be NAME=SECONDS"),
    (["--record", "make_tests=5"], r"NAME one of make_test, make_reproduce"),
    (["--record", "make_test=fast"], r"'fast' is not a number of seconds"),
    (["--record", "make_test=-3"], r"wall time -3.0 s must be a positive number"),
    (["--time-make", "clean"], r"--time-make 'clean' is not a timed target"),
    (["--only", "projection,speed"], r"names unknown benchmarks \['speed'\]"),
])
def test_bench_rejects_bad_arguments(tmp_path, capsys, argv, message):
    output = tmp_path / "bench.json"
    output.write_text('{"end_to_end": {}}')
    assert bench.main([*argv, "--output", str(output)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert output.read_text() == '{"end_to_end": {}}'


def test_bench_reproduce_log_without_total(tmp_path, capsys):
    log = tmp_path / "reproduce.log"
    log.write_text("== 01_vocabulary_gradients (profile cpu)\n")
    output = tmp_path / "bench.json"
    assert bench.main(["--reproduce-log", str(log), "--output", str(output)]) == 2
    assert "has no line '== all notebooks took N s'" in capsys.readouterr().err
    assert not output.exists()


def test_bench_records_end_to_end_and_keeps_benchmarks(tmp_path, capsys):
    output = tmp_path / "bench.json"
    output.write_text(json.dumps({"benchmarks": {"projection": {"ratio_measure_to_forward": 2.1}}}))
    log = tmp_path / "reproduce.log"
    log.write_text("== 01 took 3 s\n== all notebooks took 1234 s\n")
    assert bench.main(["--record", "make_test=512", "--reproduce-log", str(log), "--output", str(output)]) == 0
    written = json.loads(output.read_text())
    assert written["benchmarks"] == {"projection": {"ratio_measure_to_forward": 2.1}}
    assert written["end_to_end"]["make_test"]["seconds"] == 512
    assert written["end_to_end"]["make_reproduce"]["seconds"] == 1234
    assert written["end_to_end"]["make_test"]["git"]["commit"]
