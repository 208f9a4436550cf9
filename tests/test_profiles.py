from pathlib import Path

import papermill
import pytest
import yaml

from gradient_bottleneck import claims
from gradient_bottleneck.paths import REPO_ROOT
from gradient_bottleneck.profiles import PROFILES, check_profile, profile_parameters

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_unknown_profile_raises():
    with pytest.raises(ValueError, match="unknown profile 'fast'; use one of smoke, cpu, gpu"):
        check_profile("fast")
    with pytest.raises(FileNotFoundError, match="no parameters for notebook '99_missing'"):
        profile_parameters("cpu", "99_missing")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("profile", PROFILES)
def test_profile_sets_only_notebook_parameters(notebook, profile):
    declared = papermill.inspect_notebook(str(notebook))
    params = profile_parameters(profile, notebook.stem)
    unknown = set(params) - set(declared)
    assert not unknown, f"profiles/{profile}/{notebook.stem}.yaml sets {unknown}, not parameters of the notebook"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_defaults_equal_cpu_profile(notebook):
    declared = papermill.inspect_notebook(str(notebook))
    for name, value in profile_parameters("cpu", notebook.stem).items():
        default = yaml.safe_load(declared[name]["default"])
        assert default == value, f"{notebook.stem}: default {name}={default!r} differs from the cpu profile's {value!r}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_sources_have_no_outputs(notebook):
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in nb.cells) == 1


def test_claims_table_reads_verdicts_and_updates_readme(tmp_path):
    results = tmp_path / "results" / "smoke"
    results.mkdir(parents=True)
    (results / "01_demo.json").write_text(
        '{"verdicts": [{"claim": "c", "paper": "p", "ours": "o", "verdict": "partial", "profile": "smoke"}],'
        ' "provenance": {"git": {"commit": "0123456789abcdef"}}}'
    )
    rows = claims.collect_verdicts("smoke", tmp_path / "results")
    table = claims.markdown_table(rows)
    assert "| c | p | o | **partial** | `01_demo` (smoke, 01234567) |" in table
    escaped = claims.markdown_table([{**rows[0], "ours": "max |G| 1e-3"}])
    assert "max \\|G\\| 1e-3" in escaped
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{claims.START_MARK}\nold\n{claims.END_MARK}\noutro\n")
    claims.update_readme(table, readme)
    text = readme.read_text()
    assert "old" not in text
    assert table in text
    assert text.startswith("intro")
    assert text.endswith("outro\n")
    Path(readme).write_text("no markers")
    with pytest.raises(ValueError, match="lacks the markers"):
        claims.update_readme(table, readme)
