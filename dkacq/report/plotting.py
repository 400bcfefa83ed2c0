"""What every report figure shares: one legend under the panels, and saving as PNG, PDF or SVG.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot), so building a
report changes no global matplotlib state and needs no display. Each figure module has a ``draw_*``
function that returns the Figure (what tests read the plotted data from) and a ``plot_*`` function
that draws and saves it.
"""

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dkacq.formats.atomic import atomic_write

DPI = 150
FIGURE_FORMATS = ("png", "pdf", "svg")
"""What a figure can be saved as: PNG (raster) or PDF and SVG (vector, for papers)."""
_NO_DATE = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}
"""Metadata that would make two saves of one figure differ."""


def figure_format_of(path: Path, figure_format: str | None = None) -> str:
    """The format to save ``path`` as: ``figure_format``, or the file's suffix; the two must agree."""
    suffix = Path(path).suffix.lower().lstrip(".")
    chosen = (figure_format or suffix).lower()
    if chosen not in FIGURE_FORMATS:
        raise ValueError(
            f"{path}: cannot save a figure as {chosen or 'a file without a suffix'!r}; "
            f"expected one of {', '.join(FIGURE_FORMATS)}"
        )
    if suffix != chosen:
        raise ValueError(f"{path}: the file name does not end in .{chosen}, the format it is to be saved as")
    return chosen


def save_figure(figure: Figure, path: Path, figure_format: str | None = None) -> Path:
    """Write ``figure`` to ``path`` as PNG, PDF or SVG (default: ``path``'s suffix) through
    :func:`dkacq.formats.atomic.atomic_write`: never half-written."""
    chosen = figure_format_of(path, figure_format)
    atomic_write(
        path,
        lambda temporary: figure.savefig(
            temporary, format=chosen, dpi=DPI, bbox_inches="tight", pad_inches=0.15, metadata=_NO_DATE.get(chosen)
        ),
    )
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
    legend = figure.legend(
        handles, labels, loc="outside lower center", ncols=len(groups), frameon=False, handlelength=3, columnspacing=2.5
    )
    for index in headers:
        legend.get_texts()[index].set_fontweight("bold")
