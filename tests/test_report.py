import json

import nbformat

from gradient_bottleneck import report


def write_results(folder, stem, verdict, figures, executed=True):
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"verdicts": [{"claim": f"claim of {stem} <b>", "paper": "0.95", "ours": "0.93",
                             "verdict": verdict, "profile": "smoke"}],
               "provenance": {"git": {"commit": "0123456789abcdef"}}, "values": {}}
    (folder / f"{stem}.json").write_text(json.dumps(payload))
    (folder / "figures").mkdir(exist_ok=True)
    for name in figures:
        (folder / "figures" / f"{name}.png").write_bytes(b"\x89PNG")
    if executed:
        notebook = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_markdown_cell(f"# Title of {stem}\n\nSome prose."),
            nbformat.v4.new_code_cell("1 + 1", outputs=[nbformat.v4.new_output(
                "execute_result", data={"text/plain": "2"}, execution_count=1)], execution_count=1),
        ])
        nbformat.write(notebook, folder / f"{stem}.ipynb")


def test_report_renders_notebooks_and_index(tmp_path):
    results = tmp_path / "results" / "smoke"
    write_results(results, "01_vocabulary_gradients", "reproduced",
                  ["01_cumulative_energy", "01_rank_versus_tokens"])
    write_results(results, "07_other", "not reproduced", ["07_b", "07_a"], executed=False)

    index = report.build_report("smoke", tmp_path / "results", tmp_path / "out")

    assert index == tmp_path / "out" / "smoke" / "index.html"
    page = index.read_text()
    assert "claim of 01_vocabulary_gradients &lt;b&gt;" in page  # text is escaped
    assert '<a href="01_vocabulary_gradients.html">01_vocabulary_gradients</a>' in page
    assert "Title of 01_vocabulary_gradients" in page
    assert "not reproduced" in page
    assert '07_other <span class="muted">(no executed copy)</span>' in page
    # The named key figure for notebook 01, the first figure by name for an unknown notebook.
    assert '<img src="figures/01_rank_versus_tokens.png"' in page
    assert '<img src="figures/07_a.png"' in page
    rendered = (tmp_path / "out" / "smoke" / "01_vocabulary_gradients.html").read_text()
    assert "Some prose." in rendered
    assert not (tmp_path / "out" / "smoke" / "07_other.html").exists()
    assert (tmp_path / "out" / "smoke" / "figures" / "07_b.png").read_bytes() == b"\x89PNG"


def test_key_figure_named_in_results(tmp_path):
    results = tmp_path / "results" / "smoke"
    write_results(results, "02_projection_loss", "partial", ["02_a", "02_b"], executed=False)
    payload = json.loads((results / "02_projection_loss.json").read_text())
    payload["values"]["key_figure"] = "02_b"
    (results / "02_projection_loss.json").write_text(json.dumps(payload))
    [entry] = report.find_notebooks(results)
    assert entry.key_figure.name == "02_b.png"
