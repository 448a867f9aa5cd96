"""Tables and figures for experiment reports (``experiments/``): one place for the markdown and matplotlib plumbing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are ``str()``-ed and ``|`` in them is escaped."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures are only written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (100 dpi) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


MIN_RELATIVE_SPAN = 0.05
"""A y-axis spans at least this fraction of its values' magnitude (5%), so a constant series plots as a flat line
instead of magnified floating-point noise."""


def readable_ylim(ax: Any, values: Sequence[float], floor: float | None = None) -> None:
    """Y-limits of ``ax`` for ``values``: their range plus a margin, widened to at least ``MIN_RELATIVE_SPAN`` of their
    largest magnitude (1.0 when all are 0), never below ``floor``; plain tick labels (no offset, no scientific)."""
    low, high = min(values), max(values)
    span = max((high - low) * 1.1, MIN_RELATIVE_SPAN * max(abs(low), abs(high))) or 1.0
    middle = (low + high) / 2
    bottom, top = middle - span / 2, middle + span / 2
    if floor is not None and bottom < floor:
        bottom, top = floor, max(top, floor + span)
    ax.set_ylim(bottom, top)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def heatmap(ax: Any, x_labels: list[str], y_labels: list[str], values: list[list[float | None]],
            labels: list[list[str]] | None = None, threshold: float | None = None, **imshow: Any) -> Any:
    """``values[y][x]`` as coloured cells on ``ax`` (None: blank), each annotated with ``labels[y][x]`` (default the
    value to 3 figures), a black contour at ``threshold`` where the values cross it; returns the image (for a colorbar)."""
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap=imshow.pop("cmap", "RdYlGn"), **imshow)
    ax.set_xticks(range(len(x_labels)), x_labels)
    ax.set_yticks(range(len(y_labels)), y_labels)
    for y, row in enumerate(values):
        for x, value in enumerate(row):
            text = labels[y][x] if labels is not None else "" if value is None else f"{value:.3g}"
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color="white" if value is not None else "black",
                    path_effects=[_outline()])
    finite = grid[np.isfinite(grid)]
    if threshold is not None and min(grid.shape) >= 2 and finite.size and finite.min() < threshold < finite.max():
        ax.contour(grid, levels=[threshold], colors="black", linewidths=1.5)
    return image


def _outline() -> Any:
    from matplotlib import patheffects

    return patheffects.withStroke(linewidth=2, foreground="black")
