"""The benchmark command end to end at its quick sizes, each benchmark in its own process."""

import json

import pytest

from gradient_bottleneck import bench


def test_quick_training_benchmark_writes_all_ratios(tmp_path, capsys):
    output = tmp_path / "bench.json"
    assert bench.main(["--quick", "--only", "training_small", "--output", str(output)]) == 0
    result = json.loads(output.read_text())["benchmarks"]["training_small"]
    assert result["quick"] is True
    assert set(result["tokens_per_s"]) == {"tinylm_full", "tinylm_full_logits", "tinylm_factorised",
                                           "tinylm_backward_only", "hf_gpt2"}
    assert all(rate > 0 for rate in result["tokens_per_s"].values())
    assert result["parameters"]["tinylm_full"] == result["parameters"]["hf_gpt2"]
    assert result["speedup_tinylm_full_vs_hf_gpt2"] > 0
    assert result["speedup_chunked_loss_vs_logits"] > 0
    assert result["wall_s"] > 0
    assert "training_small: TinyLM / GPT2LMHeadModel tokens/s" in capsys.readouterr().out


def test_failing_child_names_the_benchmark(monkeypatch):
    # `false` replaces the interpreter, so the child exits with code 1 and prints nothing.
    monkeypatch.setattr(bench.sys, "executable", "false")
    with pytest.raises(RuntimeError, match="benchmark naive failed in its child process with exit code 1"):
        bench.run_benchmark_child("naive", quick=True)
