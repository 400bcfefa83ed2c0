"""What every report figure shares: one legend under the panels, and saving as a PNG file.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot), so building a
report changes no global matplotlib state and needs no display.
"""

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dkacq.formats.atomic import atomic_write

DPI = 150


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` through :func:`dkacq.formats.atomic.atomic_write`: never half-written."""
    atomic_write(path, lambda temporary: figure.savefig(
        temporary, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15
    ))
    return Path(path)


def legend_below(figure: Figure, groups: Sequence[tuple[str, Sequence[tuple[Line2D, str]]]]) -> None:
    """One legend under the panels, one column per group, each column headed by the group's title."""
    groups = [(title, entries) for title, entries in groups if entries]
    height = 1 + max(len(entries) for _, entries in groups)
    handles, labels, headers = [], [], []
    for title, entries in groups:
        headers.append(len(labels))
        column = [(Line2D([], [], linestyle="none"), title), *entries]
        column += [(Line2D([], [], linestyle="none"), "")] * (height - len(column))
        handles += [handle for handle, _ in column]
        labels += [label for _, label in column]
    legend = figure.legend(handles, labels, loc="outside lower center", ncols=len(groups), frameon=False,
                           handlelength=3, columnspacing=2.5)
    for index in headers:
        legend.get_texts()[index].set_fontweight("bold")
