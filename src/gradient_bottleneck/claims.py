"""The claims table: every notebook's verdict rows, read from results/<profile>/*.json."""

import json
from pathlib import Path

from .paths import REPO_ROOT, RESULTS_DIR
from .profiles import check_profile
from .results import replace_between_markers

START_MARK = "<!-- claims-table:start -->"
END_MARK = "<!-- claims-table:end -->"


def collect_verdicts(profile: str, results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Return verdict rows of every results JSON of a profile, in notebook order."""
    check_profile(profile)
    folder = Path(results_dir) / profile
    rows = []
    for path in sorted(folder.glob("[0-9][0-9]_*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"results file {path} is not valid JSON ({exc}); rerun its notebook to rewrite it") from exc
        commit = (payload.get("provenance", {}).get("git", {}).get("commit") or "unknown")[:8]
        for verdict in payload.get("verdicts", []):
            rows.append({**verdict, "notebook": path.stem, "commit": commit})
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_No results yet: run `make reproduce`._\n"
    def cell(text: str) -> str:
        # A bare "|" (as in |G|) would end the Markdown table cell early.
        return str(text).replace("|", "\\|")

    lines = ["| Claim | Paper | Ours | Verdict | Notebook (profile, commit) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {cell(row['claim'])} | {cell(row['paper'])} | {cell(row['ours'])} | **{row['verdict']}** | "
            f"`{row['notebook']}` ({row['profile']}, {row['commit']}) |"
        )
    return "\n".join(lines) + "\n"


def update_readme(table: str, readme: Path = REPO_ROOT / "README.md") -> None:
    """Replace the text between the claims-table markers in the README."""
    replace_between_markers(readme, START_MARK, END_MARK, table)
