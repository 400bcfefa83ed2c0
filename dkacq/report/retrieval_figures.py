"""Each probed layer as a retriever (``retrieval.csv``, written by ``dkacq fit`` for a collection): nDCG@10
and Recall@100 against the layer, per model, the untrained similarity (cosine, dot) as the line style,
and what was ranked (``scope``) said on the figure."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from dkacq.encoders.presets import model_sort_key
from dkacq.formats.retrieval import RETRIEVAL_FILE, RETRIEVAL_KEY, read_retrieval
from dkacq.report.plotting import legend_below, save_figure

SIMILARITY_STYLES = {"cosine": "-", "dot": "--"}
"""The line style of each untrained similarity; each model has its own colour and marker."""
MODEL_STYLES = (
    ("tab:blue", "o"),
    ("tab:orange", "s"),
    ("tab:green", "^"),
    ("tab:red", "v"),
    ("tab:purple", "D"),
    ("tab:brown", "P"),
    ("tab:pink", "X"),
    ("tab:gray", "*"),
    ("tab:olive", "<"),
    ("tab:cyan", ">"),
)
PANELS = {"ndcg@10": "nDCG@10", "recall@100": "Recall@100"}
SCOPES = {
    "corpus": "over the whole corpus",
    "pool": "re-ranking each test query's BM25 top 100 and judged passages",
}
"""What each ``scope`` ranked, in words."""


@dataclass(frozen=True)
class RetrievalResult:
    """One row of a ``retrieval.csv``: one layer's untrained similarity as a retriever."""

    dataset: str
    model: str
    pooling: str
    layer: int
    similarity: str
    scope: str
    ndcg: float
    mrr: float
    recall: float
    num_queries: int
    num_passages: int

    @property
    def curve(self) -> tuple[str, str, str, str]:
        return self.dataset, self.model, self.pooling, self.similarity


def retrieval_tables(results_csvs: Iterable[Path]) -> list[Path]:
    """The retrieval tables written beside the given results tables (a run folder holds both)."""
    found = (Path(path).parent / RETRIEVAL_FILE for path in results_csvs)
    return list(dict.fromkeys(path.resolve() for path in found if path.is_file()))


def read_retrieval_results(paths: Iterable[Path]) -> list[RetrievalResult]:
    """Every row of the tables; a row of one identity in two tables counts once, and two rows of one
    (dataset, model, pooling, layer, similarity) from other settings are refused (the figure could not
    tell which to show)."""
    rows: dict[tuple, tuple[str, RetrievalResult]] = {}
    for path in paths:
        for record in read_retrieval(path):
            key = tuple(record[column] for column in RETRIEVAL_KEY)
            row = RetrievalResult(
                dataset=record["dataset"],
                model=record["model"],
                pooling=record["pooling"],
                layer=int(record["layer"]),
                similarity=record["similarity"],
                scope=record["scope"],
                ndcg=float(record["ndcg@10"]),
                mrr=float(record["mrr@10"]),
                recall=float(record["recall@100"]),
                num_queries=int(record["num_queries"]),
                num_passages=int(record["num_passages"]),
            )
            held = rows.get(key)
            if held is not None and held[0] != record["cell_id"]:
                raise ValueError(f"{path}: more than one retrieval row for {' '.join(key)}, from other settings")
            rows[key] = (record["cell_id"], row)
    return [row for _, row in rows.values()]


def _value(row: RetrievalResult, measure: str) -> float:
    return {"ndcg@10": row.ndcg, "mrr@10": row.mrr, "recall@100": row.recall}[measure]


def scope_text(rows: Sequence[RetrievalResult]) -> str:
    """What the rows ranked: each scope in words, with the queries and passages it counts."""
    parts = []
    for scope in sorted({row.scope for row in rows}):
        counts = sorted({(row.num_queries, row.num_passages) for row in rows if row.scope == scope})
        queries, passages = counts[-1]
        parts.append(f"{SCOPES.get(scope, scope)} ({queries:,} test queries, corpus of {passages:,} passages)")
    return "; ".join(parts)


def draw_retrieval_curves(rows: Sequence[RetrievalResult], dataset: str) -> Figure:
    """nDCG@10 (left) and Recall@100 (right) against the layer: one line per (model, pooling,
    similarity), a model's colour and marker, the similarity's line style; a curve of a candidate-pool
    scope is marked so in its label."""
    rows = [row for row in rows if row.dataset == dataset]
    models = sorted({(row.model, row.pooling) for row in rows}, key=lambda key: (model_sort_key(key[0]), key[1]))
    styles = {key: MODEL_STYLES[i % len(MODEL_STYLES)] for i, key in enumerate(models)}
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    axes = figure.subplots(1, len(PANELS), squeeze=False)[0]
    curves = sorted({row.curve for row in rows}, key=lambda curve: (models.index(curve[1:3]), curve[3]))
    for ax, (measure, name) in zip(axes, PANELS.items()):
        for curve in curves:
            points = sorted((row for row in rows if row.curve == curve), key=lambda row: row.layer)
            colour, marker = styles[curve[1:3]]
            pooled = " (pool)" if {row.scope for row in points} == {"pool"} else ""
            ax.plot(
                [row.layer for row in points],
                [_value(row, measure) for row in points],
                color=colour,
                marker=marker,
                linestyle=SIMILARITY_STYLES.get(curve[3], ":"),
                label=f"{curve[1]} {curve[2]} {curve[3]}{pooled}",
            )
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("hidden state (0: embeddings)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    legend_below(
        figure,
        [
            (
                "model (pooling)",
                [(Line2D([], [], color=c, marker=m), f"{k[0]} ({k[1]})") for k, (c, m) in styles.items()],
            ),
            (
                "untrained similarity",
                [
                    (Line2D([], [], color="0.3", linestyle=style), similarity)
                    for similarity, style in SIMILARITY_STYLES.items()
                    if any(row.similarity == similarity for row in rows)
                ],
            ),
        ],
    )
    figure.suptitle(f"{dataset}: each layer as a retriever, {scope_text(rows)}", fontsize=10)
    return figure


def plot_retrieval_curves(rows: Sequence[RetrievalResult], path: Path, dataset: str, figure_format: str) -> Path:
    return save_figure(draw_retrieval_curves(rows, dataset), path, figure_format)
