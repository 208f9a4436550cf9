"""Training killed with SIGKILL at random moments leaves no half-written file and resumes from last.pt.

The run writes a weight snapshot and last.pt at every step, so most kills land during or near a
checkpoint write. Exact equality of a resumed run with an uninterrupted one is tested in
test_train_resume.py; this file is about the files a hard kill leaves behind.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradient_bottleneck.paths import REPO_ROOT
from gradient_bottleneck.train import load_checkpoint

# Long enough that a kill within 0.3 s of a save never lands after the last step, even on an
# idle machine where one step takes a few milliseconds.
STEPS = 600
KILLS = 2

CHILD = f"""
import json, sys, torch
from gradient_bottleneck.model import ModelConfig
from gradient_bottleneck.tokenizer import TokenStream
from gradient_bottleneck.train import TrainConfig, train

torch.set_num_threads(1)
tokens = torch.randint(0, 200, (4000,), generator=torch.Generator().manual_seed(0))
train_stream = TokenStream(tokens[:3000], torch.tensor([0]), ("train",), 200)
heldout_stream = TokenStream(tokens[3000:], torch.tensor([0]), ("heldout",), 200)
model = ModelConfig(vocab_size=200, context_length=16, width=16, n_layers=1, n_heads=2)
config = TrainConfig(steps={STEPS}, batch_size=4, warmup_steps=5, eval_every=10, eval_batches=1,
                     checkpoint_every=1, device="cpu", seed=0)
result = train(model, config, train_stream, heldout_stream, run_dir=sys.argv[1])
print(json.dumps({{"resumed_from_step": result.resumed_from_step, "step": result.history[-1]["step"]}}))
"""


def child_env() -> dict:
    return {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}


def assert_no_half_written_file(run_dir: Path) -> int:
    """Load every checkpoint under its final name and parse history.json; return last.pt's step."""
    for path in sorted(run_dir.rglob("*.pt")):
        load_checkpoint(path)  # raises "corrupted or truncated" on a partial file
    if (run_dir / "history.json").exists():
        json.loads((run_dir / "history.json").read_text())
    return load_checkpoint(run_dir / "last.pt")["step"]


def stray_temporary_files(run_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*.tmp"))


@pytest.fixture(scope="module")
def killed_then_finished(tmp_path_factory) -> dict:
    """Kill a run KILLS times at random moments, checking the files after each kill, then let it finish."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    command = [sys.executable, "-c", CHILD, str(run_dir)]
    delays = random.Random(0)
    steps_at_kill = []
    for kill in range(KILLS):
        process = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Wait until this launch has saved a step past the previous kill, then kill at a random moment.
        previous = steps_at_kill[-1] if steps_at_kill else 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if load_checkpoint(run_dir / "last.pt")["step"] > previous:
                    break
            except (FileNotFoundError, RuntimeError):
                pass
            time.sleep(0.02)
        time.sleep(delays.uniform(0.0, 0.3))
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL, f"kill {kill}: the run ended before it was killed"
        steps_at_kill.append(assert_no_half_written_file(run_dir))

    finished = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    return {"run_dir": run_dir, "steps_at_kill": steps_at_kill, "summary": summary}


def test_each_kill_leaves_loadable_files(killed_then_finished):
    steps = killed_then_finished["steps_at_kill"]
    assert len(steps) == KILLS
    assert all(0 < step < STEPS for step in steps), steps
    assert steps == sorted(set(steps)), f"every relaunch must save past the previous kill: {steps}"


def test_restart_resumes_from_last_checkpoint(killed_then_finished):
    summary = killed_then_finished["summary"]
    assert summary["resumed_from_step"] == killed_then_finished["steps_at_kill"][-1]
    assert summary["step"] == STEPS


def test_finished_run_has_every_checkpoint_whole(killed_then_finished):
    run_dir = killed_then_finished["run_dir"]
    assert assert_no_half_written_file(run_dir) == STEPS
    assert len(list((run_dir / "checkpoints").glob("step_*.pt"))) == STEPS + 1


# A kill inside atomic_write_bytes leaves its temporary file (".last.pt.<random>.tmp") behind, and
# each such file contains a partial copy of the weights, so train() must remove them when it resumes.
def test_resume_removes_temporary_files_of_killed_writes(tmp_path):
    import torch

    from gradient_bottleneck.model import ModelConfig
    from gradient_bottleneck.tokenizer import TokenStream
    from gradient_bottleneck.train import TrainConfig, train

    tokens = torch.randint(0, 50, (600,), generator=torch.Generator().manual_seed(0))
    streams = (TokenStream(tokens[:500], torch.tensor([0]), ("train",), 50),
               TokenStream(tokens[500:], torch.tensor([0]), ("heldout",), 50))
    model = ModelConfig(vocab_size=50, context_length=8, width=8, n_layers=1, n_heads=1)
    config = TrainConfig(steps=4, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1, device="cpu")
    train(model, config, *streams, run_dir=tmp_path, stop_after_step=2)
    # What SIGKILL during the next two checkpoint writes leaves: partial files under temporary names.
    (tmp_path / ".last.pt.k1ll3d.tmp").write_bytes((tmp_path / "last.pt").read_bytes()[:100])
    (tmp_path / "checkpoints" / ".step_000003.pt.k1ll3d.tmp").write_bytes(b"PK")

    assert train(model, config, *streams, run_dir=tmp_path).resumed_from_step == 2
    assert stray_temporary_files(tmp_path) == []


WRITER = """
import sys
from gradient_bottleneck.results import write_json

# Rewrite one results file over and over with a large payload, so that a kill lands mid-write.
for round in range(100000):
    write_json(sys.argv[1], {"round": round, "values": list(range(200000))})
"""


def test_sigkilled_results_writer_leaves_whole_json(tmp_path):
    path = tmp_path / "01_demo.json"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=child_env())
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    written = json.loads(path.read_text())  # a partial file would not parse
    assert written["round"] >= 0
    assert len(written["values"]) == 200000
