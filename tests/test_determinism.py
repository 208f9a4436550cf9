"""Smoke-profile notebooks, run twice on CPU from empty caches, write the same results."""

import json
import os
import subprocess
import sys

import pytest

from gradient_bottleneck.paths import REPO_ROOT

# 01 trains through the run cache; 03 trains SpamLang cells directly and records per-run wall times.
NOTEBOOKS = ["01_vocabulary_gradients", "03_underfitting_spamlang"]


def run_smoke(tmp_path, run: str, notebook: str) -> dict:
    """Execute the notebook with its own empty cache (new tokenizer, new training) and return its JSON.

    Both runs write to the same output_dir, because the parameters are part of the results.
    """
    output_dir = tmp_path / "results"
    env = {**os.environ, "CI": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "GRADIENT_BOTTLENECK_CACHE": str(tmp_path / f"cache_{run}"),
           "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [sys.executable, "-m", "papermill", "--log-level", "WARNING", "--kernel", "python3",
               str(REPO_ROOT / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / f"{run}.ipynb"),
               "-f", str(REPO_ROOT / "profiles" / "smoke" / f"{notebook}.yaml"), "-p", "output_dir", str(output_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if notebook.startswith("01_"):
        assert list((tmp_path / f"cache_{run}" / "runs").iterdir()), "the run did not train into its own cache"
    results = json.loads((output_dir / f"{notebook}.json").read_text())
    (output_dir / f"{notebook}.json").unlink()
    return results


def comparable(results: dict) -> dict:
    """Drop what legitimately differs between two runs: the timing block and the git dirty flag."""
    results = json.loads(json.dumps(results))
    results.pop("timing")
    results["provenance"]["git"].pop("dirty")
    return results


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_smoke_rerun_gives_identical_results(tmp_path, notebook):
    first = run_smoke(tmp_path, "first", notebook)
    second = run_smoke(tmp_path, "second", notebook)
    assert {"started_utc", "finished_utc", "wall_time_s"} <= set(first["timing"])
    assert first["values"], "the notebook recorded no values"
    assert comparable(first) == comparable(second)
