"""One figure style for every notebook, and atomic PNG saving."""

import io
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns

from .results import atomic_write_bytes

PAPER_COLOR = "#b2182b"  # reference lines for the paper's reported values
RANDOM_COLOR = "0.45"  # reference lines for the random-direction baseline


def apply_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.figsize": (6.4, 4.0), "figure.dpi": 100, "savefig.dpi": 150,
                                "axes.titlesize": "medium", "axes.titleweight": "bold"})


def paper_band(ax, low: float, high: float, label: str, orientation: str = "horizontal") -> None:
    """Shade the range the paper reports, e.g. a destroyed ratio of 0.95-0.99."""
    span = ax.axhspan if orientation == "horizontal" else ax.axvspan
    span(low, high, color=PAPER_COLOR, alpha=0.12, label=label)


def save_figure(fig, name: str, output_dir: str | Path) -> Path:
    """Save `fig` as output_dir/figures/<name>.png and return the path."""
    path = Path(output_dir) / "figures" / f"{name}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path
