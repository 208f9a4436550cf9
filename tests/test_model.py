import pytest
import torch

from gradient_bottleneck.model import ModelConfig, TinyLM


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 1}, "V=1"),
        ({"vocab_size": 100, "width": 0}, "D=0"),
        ({"vocab_size": 100, "width": 8, "n_heads": 3}, "n_heads=3"),
        ({"vocab_size": 100, "head": "lowrank"}, "unknown head kind 'lowrank'"),
        ({"vocab_size": 100, "width": 8, "n_heads": 2, "head": "factorised", "head_rank": 0}, r"r=0 must be in \[1, D=8\]"),
        ({"vocab_size": 100, "width": 8, "n_heads": 2, "head": "factorised", "head_rank": 9}, r"r=9 must be in \[1, D=8\]"),
        ({"vocab_size": 100, "width": 8, "n_heads": 2, "head": "factorised"}, "r=None"),
        ({"vocab_size": 100, "head_rank": 4}, "only applies"),
        ({"vocab_size": 100, "context_length": 0}, "context_length"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def tiny(head="full", rank=None, width=16):
    torch.manual_seed(0)
    return TinyLM(ModelConfig(vocab_size=50, context_length=12, width=width, n_layers=2, n_heads=2,
                              head=head, head_rank=rank))


@pytest.mark.parametrize(("head", "rank"), [("full", None), ("tied", None), ("factorised", 3)])
def test_logits_are_hidden_times_head(head, rank):
    model = tiny(head, rank)
    idx = torch.randint(0, 50, (2, 12))
    logits, _ = model(idx)
    hidden = model.hidden_states(idx)
    torch.testing.assert_close(logits, hidden @ model.head_weight().T, rtol=1e-5, atol=1e-5)


def test_factorised_head_has_rank_r():
    model = tiny("factorised", 3)
    assert int(torch.linalg.matrix_rank(model.head_weight().detach())) == 3
    assert model.head_weight().shape == (50, 16)


def test_tied_head_shares_embedding_and_counts_once():
    tied, full = tiny("tied"), tiny("full")
    assert tied.head_weight() is tied.embed.weight
    assert full.num_parameters() - tied.num_parameters() == 50 * 16


def test_hidden_states_are_after_final_norm():
    model = tiny()
    idx = torch.randint(0, 50, (3, 12))
    residual = model.embed(idx) + model.pos(torch.arange(12))
    for block in model.blocks:
        residual = block(residual)
    norm = model.final_norm
    expected = torch.nn.functional.layer_norm(residual, (16,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(model.hidden_states(idx), expected)


def test_attention_is_causal():
    model = tiny()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    torch.testing.assert_close(model(idx)[0][:, :8], model(changed)[0][:, :8])


def test_too_long_sequence_raises():
    with pytest.raises(ValueError, match="exceeds context_length=12"):
        tiny()(torch.zeros(1, 13, dtype=torch.long))
