import json

import pytest
import torch

from gradient_bottleneck.model import ModelConfig
from gradient_bottleneck.tokenizer import encode_split
from gradient_bottleneck.train import (TrainConfig, learning_rate, load_checkpoint, model_from_checkpoint,
                                      progress_disabled, train)


@pytest.fixture(scope="module")
def streams(small_corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return (encode_split("train", 300, small_corpus, cache), encode_split("heldout", 300, small_corpus, cache))


MODEL = ModelConfig(vocab_size=300, context_length=32, width=32, n_layers=1, n_heads=2)
SHORT = TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=2, seed=3)


def test_training_lowers_heldout_loss(streams):
    result = train(MODEL, SHORT, *streams)
    first, last = result.history[0]["heldout_loss"], result.history[-1]["heldout_loss"]
    assert [row["step"] for row in result.history] == [20, 40, 60]
    assert last < first
    # Untrained, the loss is near log V = 5.7 nats; 60 steps must get clearly below that.
    assert last < 0.9 * torch.log(torch.tensor(300.0)).item()


def test_same_seed_gives_same_history(streams):
    config = TrainConfig(steps=10, batch_size=4, warmup_steps=2, eval_every=5, eval_batches=1, seed=7)
    first = train(MODEL, config, *streams).history
    second = train(MODEL, config, *streams).history
    assert first == second


def test_run_dir_checkpoints_load_with_weights_only(streams, tmp_path):
    config = TrainConfig(steps=10, batch_size=4, warmup_steps=2, eval_every=5, eval_batches=1, checkpoint_every=5)
    result = train(MODEL, config, *streams, run_dir=tmp_path)
    assert [p.name for p in result.checkpoint_paths()] == ["step_000000.pt", "step_000005.pt", "step_000010.pt"]
    model = model_from_checkpoint(result.checkpoint_paths()[-1])
    torch.testing.assert_close(model.head_weight(), result.model.head_weight())
    assert json.loads((tmp_path / "history.json").read_text())["history"] == result.history
    again = train(MODEL, config, *streams, run_dir=tmp_path)  # finished: loaded, not retrained
    assert again.resumed_from_step == 10
    assert again.history == result.history


def test_run_dir_with_other_config_is_rejected(streams, tmp_path):
    config = TrainConfig(steps=4, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1)
    train(MODEL, config, *streams, run_dir=tmp_path)
    with pytest.raises(ValueError, match="different configuration"):
        train(MODEL, TrainConfig(steps=5, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1), *streams,
              run_dir=tmp_path)


def test_truncated_checkpoint_raises_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04 not a real checkpoint")
    with pytest.raises(RuntimeError, match="corrupted or truncated"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_nan_loss_stops_training(streams):
    config = TrainConfig(steps=5, batch_size=2, warmup_steps=0, lr=1e30, grad_clip=0.0, eval_every=5, eval_batches=1)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(MODEL, config, *streams)


def test_vocab_mismatch_raises(streams):
    with pytest.raises(ValueError, match="V=300 but the model has V=301"):
        train(ModelConfig(vocab_size=301, context_length=8, width=8, n_layers=1, n_heads=1), SHORT, *streams)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, "steps=0"), ({"lr": -1.0}, "lr=-1.0"), ({"warmup_steps": 500}, "warmup_steps=500"),
     ({"lr": float("nan")}, "lr=nan"), ({"checkpoint_every": -1}, "checkpoint_every=-1")],
)
def test_train_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_schedule_warms_up_then_decays():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(100, config) == pytest.approx(0.1)


@pytest.mark.parametrize(("ci", "setting", "silent"), [
    ("", "", False), ("1", "", True), ("", "0", True), ("", "off", True), ("", "1", False), ("", " FALSE ", True),
])
def test_progress_switches(monkeypatch, ci, setting, silent):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("GRADIENT_BOTTLENECK_PROGRESS", setting)
    assert progress_disabled() is silent
