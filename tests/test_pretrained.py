"""Measurements on Hugging Face causal LMs: tiny models built from configs and saved to disk.

Each model is measured through the loader and the command, and the values are compared with
the package's projection on independently extracted hidden states, and with a direct
computation from torch.linalg.qr and autograd.
"""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertLMHeadModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
)

from gradient_bottleneck import pretrained  # noqa: E402
from gradient_bottleneck.__main__ import main  # noqa: E402
from gradient_bottleneck.model import ModelConfig, TinyLM  # noqa: E402
from gradient_bottleneck.paths import CORPUS_DIR, REPO_ROOT  # noqa: E402
from gradient_bottleneck.projection import measure_projection  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TEXT = CORPUS_DIR / "heldout"
TOKENS = 300


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A 320-token byte-level BPE trained on one held-out document; fast enough for every run."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([(TEXT / "shakespeare_sonnets.txt").read_text(encoding="utf-8")], trainer=trainer)
    return tokenizer


def save_tokenizer(bpe: Tokenizer, folder) -> None:
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_models(bpe, tmp_path_factory) -> dict:
    folders = {}
    for family in ("gpt2", "llama"):
        for tied in (True, False):
            name = f"{family}-{'tied' if tied else 'untied'}"
            folder = tmp_path_factory.mktemp(name)
            pretrained.build_tiny_model(family, 16, tied, bpe, folder, n_layers=1, context_length=64, seed=1)
            folders[name] = folder
    return folders


def reference_destroyed_ratio(model, windows, logit_map=pretrained.LogitMap()) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Destroyed ratio from torch.linalg.qr of W and autograd through the model's own logits.

    Returns (ratio, H (C, D) from output_hidden_states, targets (C,)).
    """
    weight = model.get_output_embeddings().weight.detach().double()
    bias = model.get_output_embeddings().bias
    basis, _ = torch.linalg.qr(weight)  # (V, D), orthonormal basis of col(W)
    grads, hiddens, all_targets = [], [], []
    for window in windows:
        ids, targets = window[None, :-1], window[1:]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1][0]
        pre = (hidden.double() @ weight.T).requires_grad_(True)
        if bias is not None:
            pre_b = pre + bias.detach().double()
        else:
            pre_b = pre
        logits = logit_map.logits(pre_b)
        # The model's logits must equal phi(H W^T + b) for the reference to be meaningful.
        assert torch.allclose(logits.detach().float(), out.logits[0].float(), atol=1e-4)
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
        grads.append(pre.grad)
        hiddens.append(hidden)
        all_targets.append(targets)
    grad = torch.cat(grads)
    lost = grad - (grad @ basis) @ basis.T
    return float(lost.norm() / grad.norm()), torch.cat(hiddens), torch.cat(all_targets)


@pytest.mark.parametrize("name", ["gpt2-tied", "gpt2-untied", "llama-tied", "llama-untied"])
def test_measure_matches_references(tiny_models, name):
    loaded = pretrained.load_causal_lm(str(tiny_models[name]))
    assert loaded.tied == name.endswith("-tied")
    embedding = loaded.model.get_input_embeddings().weight
    assert (loaded.head_weight.data_ptr() == embedding.data_ptr()) == loaded.tied

    measurement = pretrained.measure_model(loaded, TEXT, max_tokens=TOKENS, progress=False)
    summary = measurement.summary()
    assert summary["tokens"] == TOKENS
    assert math.isclose(summary["destroyed_ratio"] ** 2 + summary["visible_cosine"] ** 2, 1.0, rel_tol=1e-9)

    windows = pretrained.token_windows(loaded.tokenizer, pretrained.text_files(TEXT), TOKENS, loaded.context_length)
    expected, hidden, targets = reference_destroyed_ratio(loaded.model, windows)
    assert math.isclose(summary["destroyed_ratio"], expected, rel_tol=1e-5)

    package = measure_projection(hidden, loaded.model.get_output_embeddings().weight.detach(), targets)
    assert math.isclose(summary["destroyed_ratio"], package.destroyed_ratio, rel_tol=1e-5)
    assert math.isclose(summary["visible_cosine"], package.visible_cosine, rel_tol=1e-4)
    per_token = measurement.stats.token_destroyed()
    assert torch.allclose(per_token, package.token_destroyed(), atol=1e-5)


@pytest.mark.parametrize("head", ["full", "tied", "factorised"])
def test_tinylm_export_measures_like_package(bpe, tmp_path, head):
    """A companion TinyLM exported to GPT-2 gives the same ratio as measuring the TinyLM directly."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=bpe.get_vocab_size(), context_length=32, width=16, n_layers=2, n_heads=2,
                         head=head, head_rank=4 if head == "factorised" else None)
    model = TinyLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # non-zero biases and norms, so a wrong mapping shows
                parameter.add_(torch.randn_like(parameter) * 0.1)
    pretrained.export_tinylm_to_gpt2(model, bpe, tmp_path)
    loaded = pretrained.load_causal_lm(str(tmp_path))
    assert loaded.tied == (head == "tied")

    summary = pretrained.measure_model(loaded, TEXT, max_tokens=200, progress=False).summary()
    windows = pretrained.token_windows(loaded.tokenizer, pretrained.text_files(TEXT), 200, loaded.context_length)
    with torch.no_grad():
        hidden = torch.cat([model.hidden_states(w[None, :-1])[0] for w in windows])
    targets = torch.cat([w[1:] for w in windows])
    direct = measure_projection(hidden, model.head_weight().detach(), targets)
    assert math.isclose(summary["destroyed_ratio"], direct.destroyed_ratio, rel_tol=1e-5)
    assert summary["head_rank"] == (4 if head == "factorised" else 16)


def test_tinylm_export_rejects_mismatch(bpe, tmp_path, monkeypatch):
    """The export compares logits, so a network that differs from GPT-2 is not saved silently."""
    model = TinyLM(ModelConfig(vocab_size=bpe.get_vocab_size(), context_length=16, width=16, n_layers=1, n_heads=2))
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda idx: (original(idx)[0] + 1.0, None))
    with pytest.raises(RuntimeError, match="changes its logits"):
        pretrained.export_tinylm_to_gpt2(model, bpe, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_tied_and_untied_heads_differ(tiny_models):
    tied = pretrained.load_causal_lm(str(tiny_models["gpt2-tied"]))
    untied = pretrained.load_causal_lm(str(tiny_models["gpt2-untied"]))
    assert tied.describe()["tied"] is True
    assert untied.describe()["tied"] is False
    assert untied.head_weight.data_ptr() != untied.model.get_input_embeddings().weight.data_ptr()


def test_head_bias_and_softcap_models(bpe, tmp_path):
    """Phi has a bias on its head; Gemma 2 soft-caps its logits. Both match the autograd reference."""
    vocab = bpe.get_vocab_size()
    phi = PhiForCausalLM(PhiConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64, bos_token_id=0,
                                   eos_token_id=0))
    torch.nn.init.normal_(phi.lm_head.bias, std=0.5)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=8, max_position_embeddings=64, final_logit_softcapping=0.5,
                                           bos_token_id=0, eos_token_id=0, pad_token_id=0))
    for model, folder in ((phi, tmp_path / "phi"), (gemma, tmp_path / "gemma")):
        model.save_pretrained(folder)
        save_tokenizer(bpe, folder)

    loaded_phi = pretrained.load_causal_lm(str(tmp_path / "phi"))
    assert loaded_phi.head_bias is not None
    loaded_gemma = pretrained.load_causal_lm(str(tmp_path / "gemma"))
    assert loaded_gemma.logit_map == pretrained.LogitMap(1.0, 0.5)

    for loaded in (loaded_phi, loaded_gemma):
        summary = pretrained.measure_model(loaded, TEXT, max_tokens=120, progress=False).summary()
        windows = pretrained.token_windows(loaded.tokenizer, pretrained.text_files(TEXT), 120, loaded.context_length)
        expected, _, _ = reference_destroyed_ratio(loaded.model, windows, loaded.logit_map)
        assert math.isclose(summary["destroyed_ratio"], expected, rel_tol=1e-5), loaded.source


def test_head_gradient_chain_rule_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    pre = (torch.randn(5, 40, generator=generator, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(0, 40, (5,), generator=generator)
    for logit_map in (pretrained.LogitMap(), pretrained.LogitMap(scale=0.3), pretrained.LogitMap(2.0, 1.5)):
        pre.grad = None
        torch.nn.functional.cross_entropy(logit_map.logits(pre), targets).backward()
        grad, loss = pretrained.head_gradient(pre.detach(), logit_map, targets)
        assert torch.allclose(grad, pre.grad, atol=1e-12), logit_map
        assert loss.shape == (5,)


def test_logit_map_from_config_fields():
    config = transformers.PretrainedConfig(logit_scale=0.25, final_logit_softcapping=30.0)
    assert pretrained.logit_map_from_config(config) == pretrained.LogitMap(0.25, 30.0)
    granite = transformers.PretrainedConfig(logits_scaling=8.0)
    assert pretrained.logit_map_from_config(granite) == pretrained.LogitMap(0.125, None)


def test_token_budget_spreads_over_documents(tiny_models):
    loaded = pretrained.load_causal_lm(str(tiny_models["gpt2-tied"]))
    files = pretrained.text_files(TEXT)
    windows = pretrained.token_windows(loaded.tokenizer, files, 1000, context_length=64)
    assert sum(len(w) - 1 for w in windows) == 1000
    assert all(2 <= len(w) <= 65 for w in windows)
    # Five documents share the budget, so at least five windows start a document.
    assert len(windows) >= 5 * math.ceil(200 / 64)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_measure_prints_table_and_writes_json(tiny_models, tmp_path, capsys):
    output = tmp_path / "out" / "results.json"
    code, out, err = run_cli(capsys, "measure", "--model", str(tiny_models["llama-untied"]), "--text", str(TEXT),
                             "--tokens", str(TOKENS), "--output", str(output), "--no-progress")
    assert code == 0, err
    for row in ("destroyed ratio", "visible cosine", "random baseline", "tokens", "time"):
        assert row in out
    payload = json.loads(output.read_text())
    loaded = pretrained.load_causal_lm(str(tiny_models["llama-untied"]))
    direct = pretrained.measure_model(loaded, TEXT, max_tokens=TOKENS, progress=False).summary()
    assert payload["measurement"]["destroyed_ratio"] == pytest.approx(direct["destroyed_ratio"], rel=1e-12)
    assert payload["measurement"]["tokens"] == TOKENS
    assert payload["measurement"]["random_baseline"] == pytest.approx(math.sqrt(1 - 16 / loaded.vocab_size))
    assert payload["provenance"]["parameters"]["model"] == str(tiny_models["llama-untied"])
    assert "transformers" in payload["provenance"]["versions"]


def test_cli_env_lists_components(capsys):
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    for name in ("torch", "transformers", "device", "datasets", "hub access"):
        assert name in out


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything opens a non-loopback connection."""
    original = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access attempted to {address}")
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_cli_missing_model_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "measure", "--model", str(tmp_path / "absent"))
    assert_clean_error(code, err, "not found", str(tmp_path / "absent"))


def test_cli_folder_without_config(tmp_path, capsys):
    code, _, err = run_cli(capsys, "measure", "--model", str(tmp_path))
    assert_clean_error(code, err, "config.json")


def test_cli_hub_id_offline(monkeypatch, no_network, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "measure", "--model", "example-org/not-cached-model")
    assert_clean_error(code, err, "not in the Hugging Face cache", "--allow-download")


def test_cli_hub_id_offline_even_with_allow_download(monkeypatch, no_network, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "measure", "--model", "example-org/not-cached-model", "--allow-download")
    assert_clean_error(code, err, "example-org/not-cached-model")


def test_cli_masked_lm_rejected(bpe, tmp_path, capsys):
    BertForMaskedLM(BertConfig(vocab_size=bpe.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    save_tokenizer(bpe, tmp_path)
    code, _, err = run_cli(capsys, "measure", "--model", str(tmp_path))
    assert_clean_error(code, err, "BertForMaskedLM", "is not a causal LM")


def test_bidirectional_model_under_causal_name_fails_probe(bpe, tmp_path, capsys):
    """BertLMHeadModel is listed as a causal LM but attends both ways unless is_decoder=True."""
    BertLMHeadModel(BertConfig(vocab_size=bpe.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32, is_decoder=False)).save_pretrained(tmp_path)
    save_tokenizer(bpe, tmp_path)
    code, _, err = run_cli(capsys, "measure", "--model", str(tmp_path))
    assert_clean_error(code, err, "not causal")


def test_cli_empty_text(tiny_models, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    code, _, err = run_cli(capsys, "measure", "--model", str(tiny_models["gpt2-tied"]), "--text", str(empty))
    assert_clean_error(code, err, "empty")
    folder = tmp_path / "no_text"
    folder.mkdir()
    code, _, err = run_cli(capsys, "measure", "--model", str(tiny_models["gpt2-tied"]), "--text", str(folder))
    assert_clean_error(code, err, "no .txt files")


def test_cli_bad_options(tiny_models, capsys):
    code, _, err = run_cli(capsys, "measure", "--model", str(tiny_models["gpt2-tied"]), "--tokens", "0")
    assert_clean_error(code, err, "--tokens 0")
    code, _, err = run_cli(capsys, "measure", "--model", str(tiny_models["gpt2-tied"]), "--context-length", "4096")
    assert_clean_error(code, err, "exceeds the model's limit of 64")


def test_command_offline_subprocess_has_no_traceback():
    """The installed entry point, run as a user would, with the hub blocked by HF_HUB_OFFLINE."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "1"}
    result = subprocess.run([sys.executable, "-m", "gradient_bottleneck", "measure", "--model", "gpt2"],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--allow-download" in result.stderr


def test_resolve_model_spec_caches_and_passes_through(bpe, tmp_path):
    first = pretrained.resolve_model_spec("tiny-llama-d16-untied", bpe, n_layers=1, context_length=32, cache_dir=tmp_path)
    again = pretrained.resolve_model_spec("tiny-llama-d16-untied", bpe, n_layers=1, context_length=32, cache_dir=tmp_path)
    assert first == again
    assert (tmp_path / "hf_models").is_dir()
    assert pretrained.resolve_model_spec("EleutherAI/pythia-160m", bpe, cache_dir=tmp_path) == "EleutherAI/pythia-160m"
    with pytest.raises(ValueError, match="training recipe"):
        pretrained.resolve_model_spec("trained-d16", bpe, cache_dir=tmp_path)


def test_jsonl_documents_stream_one_window_each(tiny_models, tmp_path, capsys):
    rows = [{"text": (TEXT / "shakespeare_sonnets.txt").read_text(encoding="utf-8")[i * 3000:(i + 1) * 3000]}
            for i in range(6)]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    loaded = pretrained.load_causal_lm(str(tiny_models["gpt2-untied"]))
    windows = pretrained.token_windows(loaded.tokenizer, pretrained.text_documents(source), 200, context_length=64)
    assert sum(len(w) - 1 for w in windows) == 200
    assert len(windows) == 4  # 64 + 64 + 64 + 8 targets, one window per document
    code, out, err = run_cli(capsys, "measure", "--model", str(tiny_models["gpt2-untied"]), "--text", str(source),
                             "--tokens", "200", "--no-progress")
    assert code == 0, err
    assert "streamed document(s)" in out


def test_bfloat16_head_keeps_small_directions():
    """A bfloat16 head with singular values spread over 1..100 keeps all D directions."""
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(600, 32, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator, dtype=torch.float64))
    head = ((left * torch.logspace(0, 2, 32, dtype=torch.float64)) @ right.T).to(torch.bfloat16)
    hidden = torch.randn(50, 32, generator=generator) * 0.05
    targets = torch.randint(0, 600, (50,), generator=generator)

    stats, _ = pretrained.measure_hidden_states([(hidden, targets)], head, chunk_size=16)
    assert stats.head_rank == 32

    exact = head.double()
    grad = torch.softmax(hidden.double() @ exact.T, dim=-1)
    grad[torch.arange(50), targets] -= 1.0
    basis, _ = torch.linalg.qr(exact)
    expected = float((grad - (grad @ basis) @ basis.T).norm() / grad.norm())
    assert math.isclose(stats.destroyed_ratio, expected, rel_tol=1e-5)


def test_cli_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run_cli(capsys, "measure", "--model", str(tmp_path))
    assert_clean_error(code, err, "model.safetensors")
    assert "not a local directory" not in err
