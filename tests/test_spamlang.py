import math

import pytest
import torch

from gradient_bottleneck.model import ModelConfig
from gradient_bottleneck.spamlang import (
    SpamLangData,
    best_run,
    circle_accuracy,
    circle_scale,
    circle_tinylm,
    evaluate_sequences,
    generate,
    steps_for_budget,
    train_sequences,
)
from gradient_bottleneck.train import TrainConfig


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run these small models on one thread: on a busy 2-core machine OpenMP spin-waits slow them tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_repeated_sequences_repeat_one_symbol():
    data = generate("repeated", vocab_size=50, budget_tokens=640, seq_len=64, seed=3)
    inputs, targets = data.sequences(torch.arange(data.num_sequences))
    assert inputs.shape == (10, 64)
    assert torch.equal(inputs, targets)
    assert torch.equal(inputs, inputs[:, :1].expand(-1, 64))
    assert int(inputs.min()) >= 0
    assert int(inputs.max()) < 50


def test_coverage_sequences_draw_every_position():
    data = generate("coverage", vocab_size=50, budget_tokens=640, seq_len=8, seed=3)
    inputs, targets = data.sequences(torch.arange(data.num_sequences))
    assert inputs.shape == (80, 8)
    assert torch.equal(inputs, targets)
    # 640 independent draws from 50 symbols: rows that repeat one symbol 8 times are (1/50)^7 events.
    assert (inputs != inputs[:, :1]).any(dim=1).all()


@pytest.mark.parametrize("variant, seq_len", [("repeated", 64), ("coverage", 1), ("coverage", 16)])
def test_budget_accounting(variant, seq_len):
    data = generate(variant, vocab_size=1000, budget_tokens=100_003, seq_len=seq_len, seed=0)
    stats = data.coverage()
    assert data.supervised_tokens == (100_003 // seq_len) * seq_len
    assert stats["supervised_tokens"] == data.supervised_tokens
    expected_draws = data.num_sequences if variant == "repeated" else data.supervised_tokens
    assert stats["independent_draws"] == expected_draws
    assert int(data.draw_counts().sum()) == expected_draws
    assert stats["draws_per_symbol"] == pytest.approx(expected_draws / 1000)
    assert stats["supervised_tokens_per_symbol"] == pytest.approx(data.supervised_tokens / 1000)


def test_symbol_counts_match_bincount():
    data = generate("repeated", vocab_size=7, budget_tokens=64 * 500, seq_len=64, seed=1)
    counts = data.draw_counts()
    inputs, _ = data.sequences(torch.arange(data.num_sequences))
    first_symbols = inputs[:, 0]
    for symbol in range(7):
        assert int(counts[symbol]) == int((first_symbols == symbol).sum())
    # Uniform draws: each of 7 symbols gets 500 / 7 = 71.4 draws on average, with std about 7.8.
    assert int(counts.min()) > 40
    assert int(counts.max()) < 105


def test_never_seen_share_matches_poisson():
    # 2,000 repeated sequences over V = 4,000 symbols: 0.5 draws per symbol, so about exp(-0.5) = 61 %
    # of symbols are never drawn; the binomial std of that share is under 1 %.
    data = generate("repeated", vocab_size=4000, budget_tokens=2000 * 64, seq_len=64, seed=2)
    stats = data.coverage()
    assert stats["never_seen_share"] == pytest.approx(math.exp(-0.5), abs=0.03)
    assert stats["min_draws"] == 0
    coverage = generate("coverage", vocab_size=4000, budget_tokens=2000 * 64, seq_len=1, seed=2).coverage()
    assert coverage["never_seen_share"] < 1e-3


def test_generate_is_deterministic_by_seed():
    first = generate("coverage", vocab_size=300, budget_tokens=5000, seq_len=4, seed=11)
    again = generate("coverage", vocab_size=300, budget_tokens=5000, seq_len=4, seed=11)
    other = generate("coverage", vocab_size=300, budget_tokens=5000, seq_len=4, seed=12)
    assert torch.equal(first.symbols, again.symbols)
    assert not torch.equal(first.symbols, other.symbols)


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "shuffled"}, "unknown SpamLang variant"),
    ({"vocab_size": 1}, "vocabulary size V=1"),
    ({"vocab_size": 2.5}, "vocabulary size V=2.5"),
    ({"seq_len": 0}, "sequence length T=0"),
    ({"budget_tokens": 10}, "budget_tokens=10"),
    ({"seed": None}, "seed=None"),
])
def test_generate_rejects_bad_inputs(kwargs, message):
    arguments = {"variant": "repeated", "vocab_size": 10, "budget_tokens": 640, "seq_len": 64, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(**arguments)


@pytest.mark.parametrize("vocab_size", [2, 3, 256, 4096])
def test_circle_construction_is_exact(vocab_size):
    result = circle_accuracy(vocab_size, margin=20.0)
    assert result["accuracy"] == 1.0
    assert result["min_logit_gap"] == pytest.approx(20.0, rel=1e-4)
    # Each query's loss is log(1 + sum of exp(-gap)); the two neighbours alone contribute 2 e^-20.
    assert result["loss"] < 3 * math.exp(-20.0)


def test_circle_construction_at_largest_vocabulary():
    result = circle_accuracy(131_072, margin=20.0, queries=512, seed=5)
    assert result["queries"] == 512
    assert result["accuracy"] == 1.0
    assert result["min_logit_gap"] == pytest.approx(20.0, rel=1e-3)


def test_circle_scale_matches_the_nearest_gap():
    vocab_size = 1000
    scale = circle_scale(vocab_size, margin=5.0)
    gap = scale * (1 - math.cos(2 * math.pi / vocab_size))
    assert gap == pytest.approx(5.0, rel=1e-12)
    with pytest.raises(ValueError, match="margin=0"):
        circle_scale(vocab_size, margin=0)
    with pytest.raises(ValueError, match="queries=0"):
        circle_accuracy(vocab_size, queries=0)


@pytest.mark.parametrize("head", ["full", "tied"])
def test_circle_tinylm_predicts_every_symbol(head):
    config = ModelConfig(vocab_size=1024, width=8, context_length=64, n_layers=2, n_heads=2, head=head)
    model = circle_tinylm(config, margin=20.0)
    data = generate("repeated", vocab_size=1024, budget_tokens=64 * 100, seq_len=64, seed=4)
    result = evaluate_sequences(model, data, batch_size=16)
    assert result["heldout_accuracy"] == 1.0
    assert result["heldout_loss"] < 1e-6
    every_symbol = SpamLangData(symbols=torch.arange(1024)[:, None], seq_len=1, vocab_size=1024, variant="coverage")
    assert evaluate_sequences(model, every_symbol)["heldout_accuracy"] == 1.0


def test_circle_tinylm_rejects_narrow_or_factorised_heads():
    with pytest.raises(ValueError, match="D=2"):
        circle_tinylm(ModelConfig(vocab_size=16, width=2, n_heads=1))
    with pytest.raises(ValueError, match="factorised"):
        circle_tinylm(ModelConfig(vocab_size=16, width=8, n_heads=2, head="factorised", head_rank=4))


def small_run(lr=1e-2, seed=0, steps=None, vocab_size=16):
    data = generate("repeated", vocab_size=vocab_size, budget_tokens=16 * 16 * 40, seq_len=16, seed=seed)
    heldout = generate("repeated", vocab_size=vocab_size, budget_tokens=16 * 64, seq_len=16, seed=seed + 1)
    config = ModelConfig(vocab_size=vocab_size, width=16, context_length=16, n_layers=1, n_heads=2)
    steps = steps or steps_for_budget(data, 16)
    train_config = TrainConfig(steps=steps, batch_size=16, lr=lr, warmup_steps=4, eval_every=10, seed=seed)
    return train_sequences(config, train_config, data, heldout)


def test_training_learns_a_small_vocabulary():
    run = small_run()
    assert len(run.history) == 4
    assert run.history[-1]["tokens_seen"] == 40 * 16 * 16
    assert run.final["diverged"] is False
    assert run.final["heldout_accuracy"] == 1.0
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]


def test_training_is_deterministic_by_seed():
    first, again = small_run(steps=12), small_run(steps=12)
    assert first.history == again.history
    assert first.final == again.final


def test_training_rejects_mismatched_inputs():
    data = generate("repeated", vocab_size=16, budget_tokens=640, seq_len=64, seed=0)
    config = ModelConfig(vocab_size=16, width=8, context_length=64, n_heads=2)
    with pytest.raises(ValueError, match="use steps <= 2"):
        train_sequences(config, TrainConfig(steps=3, batch_size=4, warmup_steps=0), data, data)
    with pytest.raises(ValueError, match="context_length=32"):
        short = ModelConfig(vocab_size=16, width=8, context_length=32, n_heads=2)
        train_sequences(short, TrainConfig(steps=1, batch_size=4, warmup_steps=0), data, data)
    with pytest.raises(ValueError, match="the model has V=17"):
        wrong_vocab = ModelConfig(vocab_size=17, width=8, context_length=64, n_heads=2)
        train_sequences(wrong_vocab, TrainConfig(steps=1, batch_size=4, warmup_steps=0), data, data)
    with pytest.raises(ValueError, match="fewer than batch_size=20"):
        steps_for_budget(data, 20)


def test_best_run_prefers_accuracy_then_loss():
    low, high = small_run(lr=1e-2, steps=12), small_run(lr=1e-4, steps=12)
    low.final.update(end_train_accuracy=0.5, end_train_loss=3.0)
    high.final.update(end_train_accuracy=0.6, end_train_loss=4.0)
    assert best_run([low, high]) is high
    high.final.update(end_train_accuracy=0.5)
    assert best_run([high, low]) is low


def test_best_run_skips_diverged_runs():
    low, high = small_run(lr=1e-2, steps=12), small_run(lr=1e-4, steps=12)
    high.final.update(diverged=True, end_train_accuracy=1.0)
    assert best_run([high, low]) is low
    with pytest.raises(ValueError, match="at least one run"):
        best_run([])
