"""A run interrupted and relaunched with the same arguments ends exactly where an uninterrupted run ends."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from gradient_bottleneck.external_corpus import load_corpus
from gradient_bottleneck.model import ModelConfig
from gradient_bottleneck.paths import REPO_ROOT
from gradient_bottleneck.tokenizer import TokenStream
from gradient_bottleneck.train import TrainConfig, load_checkpoint, train

@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models run slower, not faster, on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODEL = ModelConfig(vocab_size=300, context_length=16, width=32, n_layers=1, n_heads=2)


def streams():
    generator = torch.Generator().manual_seed(0)
    # A learnable stream (each token mostly follows from the previous one) so the loss moves.
    tokens = [0]
    for noise in torch.rand(6000, generator=generator).tolist():
        tokens.append((tokens[-1] * 7 + 3) % 300 if noise < 0.8 else int(noise * 1e6) % 300)
    tokens = torch.tensor(tokens)
    return (TokenStream(tokens[:5000], torch.tensor([0]), ("train",), 300),
            TokenStream(tokens[5000:], torch.tensor([0]), ("heldout",), 300))


@pytest.mark.parametrize("head,rank", [("full", None), ("backward_only", 4)])
def test_stopped_run_resumes_to_same_end(tmp_path, head, rank):
    model = ModelConfig(**{**MODEL.to_dict(), "head": head, "head_rank": rank})
    config = TrainConfig(steps=20, batch_size=4, eval_every=6, warmup_steps=4, device="cpu", seed=3)
    train_stream, heldout_stream = streams()
    reference = train(model, config, train_stream, heldout_stream, tmp_path / "reference")

    # Stop between evaluations (step 9), so the running training-loss mean must be restored too.
    stopped = train(model, config, train_stream, heldout_stream, tmp_path / "resumed", stop_after_step=9)
    assert stopped.stopped_at_step == 9
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 9
    resumed = train(model, config, train_stream, heldout_stream, tmp_path / "resumed")
    assert resumed.resumed_from_step == 9
    assert resumed.stopped_at_step is None

    assert resumed.history == reference.history  # same evaluations, same floats
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert reference.history[-1]["heldout_loss"] < reference.history[0]["heldout_loss"]


def test_resume_rejects_changed_configuration(tmp_path):
    train_stream, heldout_stream = streams()
    config = TrainConfig(steps=4, batch_size=2, eval_every=2, warmup_steps=1, device="cpu")
    train(MODEL, config, train_stream, heldout_stream, tmp_path, stop_after_step=2)
    changed = TrainConfig(steps=4, batch_size=2, eval_every=2, warmup_steps=1, device="cpu", lr=1e-3)
    with pytest.raises(ValueError, match="different configuration"):
        train(MODEL, changed, train_stream, heldout_stream, tmp_path)


def test_stop_after_step_is_validated():
    train_stream, heldout_stream = streams()
    config = TrainConfig(steps=4, batch_size=2, eval_every=2, warmup_steps=1, device="cpu")
    with pytest.raises(ValueError, match="stop_after_step=5"):
        train(MODEL, config, train_stream, heldout_stream, stop_after_step=5)


def write_text_corpus(folder):
    """Ten small documents of pseudo-English made from a fixed word list, seeded."""
    words = "the of and to in a is that for it as with was on be by he his at or from".split()
    rng = random.Random(0)
    folder.mkdir()
    for i in range(10):
        text = " ".join(rng.choice(words) for _ in range(1500))
        (folder / f"doc{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def pretrain_command(corpus, data_dir, run_dir, steps):
    return [sys.executable, "-m", "gradient_bottleneck.pretrain", "--run-dir", str(run_dir),
            "--corpus", str(corpus), "--data-dir", str(data_dir), "--vocab-size", "300",
            "--heldout-fraction", "0.2", "--context_length", "16", "--width", "32", "--n_layers", "1",
            "--n_heads", "2", "--steps", str(steps), "--batch_size", "4", "--warmup_steps", "5",
            "--eval_every", "10", "--eval_batches", "1", "--device", "cpu"]


def subprocess_env():
    return {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}


def test_sigkilled_run_resumes_to_same_loss(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus")
    steps = 300
    # Kill the run with SIGKILL as soon as it has written a resumable checkpoint.
    command = pretrain_command(corpus, tmp_path / "data", tmp_path / "killed", steps)
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (tmp_path / "killed" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL

    relaunched = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert relaunched.returncode == 0, relaunched.stderr
    summary = json.loads(relaunched.stdout.strip().splitlines()[-1])
    assert 0 < summary["resumed_from_step"] < steps, summary  # it really resumed mid-run

    # The uninterrupted reference: the same configuration on the same encoded corpus, in this process.
    train_stream, heldout_stream = load_corpus(tmp_path / "data")
    model = ModelConfig(vocab_size=300, context_length=16, width=32, n_layers=1, n_heads=2)
    config = TrainConfig(steps=steps, batch_size=4, warmup_steps=5, eval_every=10, eval_batches=1, device="cpu")
    reference = train(model, config, train_stream, heldout_stream).history[-1]
    assert summary["step"] == steps
    assert reference["step"] == steps
    assert summary["heldout_loss"] == reference["heldout_loss"]
    assert summary["heldout_accuracy"] == reference["heldout_accuracy"]
