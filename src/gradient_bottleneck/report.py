"""Render the executed notebooks of a profile to HTML, with an index page of the claims.

    python -m gradient_bottleneck.report --profile cpu

reads results/<profile>/ (the executed NN_name.ipynb copies that `make reproduce` writes, their
NN_name.json results and figures/) and writes build/report/<profile>/:
    NN_name.html   each executed notebook, converted by nbconvert's HTML exporter;
    figures/       copies of the figures, so the folder can be moved or served as it is;
    index.html     the claims table (paper value, ours, profile, verdict) built from the results
                   JSON, the key figure of each notebook, and links to every notebook.
Any subset of notebooks works: a notebook with results but no executed copy (the smoke profile
runs under nbval and keeps none) is listed without a link.
"""

import argparse
import datetime as _dt
import html
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .claims import collect_verdicts
from .paths import REPO_ROOT, RESULTS_DIR, resolve
from .profiles import check_profile
from .results import atomic_write_bytes, git_commit

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = REPO_ROOT / "build" / "report"

# The figure that carries each notebook's finding. A results JSON may name its own with
# values["key_figure"]; otherwise the first figure of the notebook in file-name order is used.
KEY_FIGURES = {
    "01_vocabulary_gradients": "01_rank_versus_tokens",
    "02_projection_loss": "02_destroyed_ratio_versus_width",
    "03_underfitting_spamlang": "03_underfitting_spamlang_heatmap",
}


@dataclass
class NotebookEntry:
    """Files of one notebook in a results folder."""

    stem: str  # e.g. "01_vocabulary_gradients"
    executed: Path | None = None  # results/<profile>/<stem>.ipynb
    results: Path | None = None  # results/<profile>/<stem>.json
    figures: list[Path] = field(default_factory=list)
    title: str = ""
    key_figure: Path | None = None


def notebook_title(path: Path | None, stem: str) -> str:
    """Return the first Markdown heading of a notebook, or the stem when there is none."""
    if path is not None:
        try:
            cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        except (OSError, json.JSONDecodeError):
            cells = []
        for cell in cells:
            if cell.get("cell_type") != "markdown":
                continue
            source = cell.get("source", "")
            text = "".join(source) if isinstance(source, list) else source
            for line in text.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return stem.replace("_", " ")


def find_notebooks(folder: Path) -> list[NotebookEntry]:
    """Collect executed notebooks, results and figures of one results folder, by notebook stem."""
    stems = sorted({p.stem for p in folder.glob("[0-9][0-9]_*.ipynb")} | {p.stem for p in folder.glob("[0-9][0-9]_*.json")})
    figures = sorted((folder / "figures").glob("*.png"))
    entries = []
    for stem in stems:
        entry = NotebookEntry(stem)
        if (folder / f"{stem}.ipynb").is_file():
            entry.executed = folder / f"{stem}.ipynb"
        if (folder / f"{stem}.json").is_file():
            entry.results = folder / f"{stem}.json"
        number = stem[:3]  # figures are named after their notebook's number, e.g. "01_"
        entry.figures = [p for p in figures if p.name.startswith(number)]
        entry.title = notebook_title(entry.executed, stem)
        entry.key_figure = choose_key_figure(entry)
        entries.append(entry)
    return entries


def choose_key_figure(entry: NotebookEntry) -> Path | None:
    named = None
    if entry.results is not None:
        try:
            named = json.loads(entry.results.read_text(encoding="utf-8")).get("values", {}).get("key_figure")
        except (OSError, json.JSONDecodeError):
            named = None
    named = named or KEY_FIGURES.get(entry.stem)
    for figure in entry.figures:
        if named and figure.stem == Path(named).stem:
            return figure
    return entry.figures[0] if entry.figures else None


def render_notebook(executed: Path, destination: Path) -> None:
    """Convert one executed notebook to a standalone HTML page (outputs and images embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    try:
        notebook = nbformat.read(executed, as_version=4)
    except Exception as exc:  # nbformat raises several JSON and validation errors
        raise RuntimeError(f"executed notebook {executed} is unreadable ({exc}); rerun make reproduce") from exc
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(notebook)
    write_page(destination, body)


def write_page(path: Path, text: str) -> None:
    """Write an HTML page atomically, readable by everyone so a web server can serve it."""
    atomic_write_bytes(path, text.encode("utf-8"))
    path.chmod(0o644)  # the temporary file behind the atomic write is created 0600


VERDICT_COLORS = {"reproduced": "#1a7f37", "partial": "#9a6700", "not reproduced": "#cf222e"}

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }
table { border-collapse: collapse; width: 100%; font-size: 0.92rem; }
th, td { border: 1px solid #d0d7de; padding: 0.35rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
.verdict { font-weight: bold; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
.muted { color: #656d76; }
"""


def index_page(profile: str, entries: list[NotebookEntry], rows: list[dict], rendered: set[str]) -> str:
    """Return the HTML of index.html: the claims table, then one section per notebook."""
    esc = html.escape
    git = git_commit()
    commit = (git["commit"] or "unknown")[:8] + (" (with uncommitted changes)" if git["dirty"] else "")
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    by_stem = {entry.stem: entry for entry in entries}

    def notebook_link(stem: str) -> str:
        if stem in rendered:
            return f'<a href="{esc(stem)}.html">{esc(stem)}</a>'
        return f'{esc(stem)} <span class="muted">(no executed copy)</span>'

    lines = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>Claims and notebooks: {esc(profile)} profile</title>", f"<style>{PAGE_STYLE}</style>", "</head>",
        "<body>",
        f"<h1>Claims and notebooks, {esc(profile)} profile</h1>",
        f'<p class="muted">Generated {esc(generated)} from results/{esc(profile)}/ at commit {esc(commit)}. '
        "Every value comes from the results JSON the notebooks wrote.</p>",
        "<h2>Claims</h2>",
    ]
    if rows:
        lines.append("<table><thead><tr><th>Claim</th><th>Paper</th><th>Ours</th><th>Profile</th><th>Verdict</th>"
                     "<th>Notebook</th><th>Key figure</th></tr></thead><tbody>")
        for row in rows:
            entry = by_stem.get(row["notebook"])
            figure = entry.key_figure if entry else None
            figure_cell = (f'<a href="figures/{esc(figure.name)}">{esc(figure.stem)}</a>' if figure
                           else '<span class="muted">none</span>')
            color = VERDICT_COLORS.get(row["verdict"], "#1f2328")
            lines.append(
                f"<tr><td>{esc(row['claim'])}</td><td>{esc(row['paper'])}</td><td>{esc(row['ours'])}</td>"
                f"<td>{esc(row['profile'])}</td>"
                f'<td class="verdict" style="color: {color}">{esc(row["verdict"])}</td>'
                f"<td>{notebook_link(row['notebook'])} <span class=\"muted\">({esc(row['commit'])})</span></td>"
                f"<td>{figure_cell}</td></tr>"
            )
        lines.append("</tbody></table>")
    else:
        lines.append(f"<p>No verdicts in results/{esc(profile)}/ yet: run <code>make reproduce PROFILE={esc(profile)}</code>.</p>")

    lines.append("<h2>Notebooks</h2>")
    for entry in entries:
        lines.append(f"<h3>{esc(entry.title)}</h3>")
        lines.append(f"<p>{notebook_link(entry.stem)}</p>")
        if entry.key_figure is not None:
            name = esc(entry.key_figure.name)
            lines.append(f'<figure><a href="figures/{name}"><img src="figures/{name}" alt="{esc(entry.key_figure.stem)}">'
                         f"</a><figcaption>Key figure: {esc(entry.key_figure.stem)}</figcaption></figure>")
        others = [figure for figure in entry.figures if figure != entry.key_figure]
        if others:
            links = ", ".join(f'<a href="figures/{esc(f.name)}">{esc(f.stem)}</a>' for f in others)
            lines.append(f"<p>Other figures: {links}</p>")
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)


def build_report(profile: str, results_dir: Path = RESULTS_DIR, output_dir: Path = DEFAULT_OUTPUT_DIR) -> Path:
    """Write build/report/<profile>/ (notebook pages, figures, index.html); return the index path."""
    check_profile(profile)
    folder = Path(results_dir) / profile
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} not found; run `make reproduce PROFILE={profile}` first")
    entries = find_notebooks(folder)
    if not entries:
        raise FileNotFoundError(
            f"{folder} holds no NN_name.ipynb or NN_name.json; run `make reproduce PROFILE={profile}` first"
        )
    destination = Path(output_dir) / profile
    try:
        destination.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create report folder {destination} ({exc.strerror}); "
                                 "pass a writable --output-dir") from exc
    rows = collect_verdicts(profile, Path(results_dir))

    rendered = set()
    for entry in entries:
        if entry.executed is not None:
            render_notebook(entry.executed, destination / f"{entry.stem}.html")
            rendered.add(entry.stem)
            log.info("rendered notebook=%s", entry.stem)
    (destination / "figures").mkdir(exist_ok=True)
    for entry in entries:
        for figure in entry.figures:
            shutil.copyfile(figure, destination / "figures" / figure.name)
    index = destination / "index.html"
    write_page(index, index_page(profile, entries, rows, rendered))
    return index


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m gradient_bottleneck.report",
                                     description="Render executed notebooks to HTML with an index of the claims.")
    parser.add_argument("--profile", default="cpu", help="results profile to render: smoke, cpu or gpu (default: cpu)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="folder holding <profile>/ (default: results)")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR),
                        help="the report goes to OUTPUT_DIR/<profile>/ (default: build/report)")
    args = parser.parse_args(argv)
    try:
        index = build_report(args.profile, resolve(args.results_dir), resolve(args.output_dir))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report written: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
