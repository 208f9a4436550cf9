"""Two torchrun processes on the CPU (gloo, loopback only) train one model in lockstep."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradient_bottleneck.external_corpus import load_corpus
from gradient_bottleneck.model import ModelConfig
from gradient_bottleneck.paths import REPO_ROOT
from gradient_bottleneck.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import write_text_corpus  # noqa: E402

torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(torchrun is None, reason="torchrun is not installed next to this Python")
def test_ddp_ranks_match_each_other_and_one_process(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus")
    steps, batch = 6, 2
    command = [
        torchrun, "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_loopback_port()}", "-m", "gradient_bottleneck.pretrain",
        "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus), "--data-dir", str(tmp_path / "data"),
        "--vocab-size", "300", "--heldout-fraction", "0.2", "--context_length", "16", "--width", "32",
        "--n_layers", "1", "--n_heads", "2", "--steps", str(steps), "--batch_size", str(batch),
        "--warmup_steps", "2", "--eval_every", "3", "--eval_batches", "1", "--device", "cpu",
        "--parallel", "ddp", "--write-rank-weights",
    ]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2
    assert summary["step"] == steps

    rank0 = torch.load(tmp_path / "run" / "rank0_weights.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "run" / "rank1_weights.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"

    # Each rank took its half of the same 2 B windows, so one process with batch 2 B matches
    # up to the order of floating-point sums in the gradient all-reduce.
    train_stream, heldout_stream = load_corpus(tmp_path / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(ModelConfig(vocab_size=300, context_length=16, width=32, n_layers=1, n_heads=2),
                       TrainConfig(steps=steps, batch_size=2 * batch, warmup_steps=2, eval_every=3, eval_batches=1,
                                   device="cpu"), train_stream, heldout_stream)
    finally:
        torch.set_num_threads(threads)
    initial = torch.load(tmp_path / "run" / "checkpoints" / "step_000000.pt", weights_only=True)["model"]
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(initial["blocks.0.mlp.0.weight"], rank0["blocks.0.mlp.0.weight"])  # it trained
