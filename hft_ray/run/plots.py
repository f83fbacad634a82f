"""PNG figures of forgetting matrices: one heatmap per method, and a comparison of methods.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, never through
pyplot: no global figure state, no GUI backend, safe in Ray workers and tests.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Collection, Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hft_ray.core.metrics import ForgettingMatrix, summary

# The metrics a comparison shows as bars, in this order (those defined for some method).
BAR_METRICS = ("OP", "BWT", "FWT", "forgetting", "heldout_delta")


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)


def heatmap(matrix: ForgettingMatrix, title: str, path: str | os.PathLike) -> None:
    """Heatmap of R: rows = base and stages, columns = domains, colours fixed to [0, 1] so that
    figures of different methods compare. The cell of the domain a row's stage trained on is
    boxed and its value bold."""
    n_rows, n_cols = len(matrix.rows), len(matrix.columns)
    fig = Figure(figsize=(2.0 + 1.1 * n_cols, 1.5 + 0.55 * n_rows), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix.scores, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="score")
    slanted = n_cols > 4  # long domain names side by side would overlap
    ax.set_xticks(range(n_cols), matrix.columns, rotation=30 if slanted else 0,
                  ha="right" if slanted else "center")
    ax.set_yticks(range(n_rows), matrix.rows)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after stage")
    ax.set_title(title)
    for r, row in enumerate(matrix.scores):
        trained = matrix.stage_domains[r - 1] if r > 0 else None
        for c, value in enumerate(row):
            is_trained = matrix.columns[c] == trained
            # Dark text on the light (yellow) end of viridis, light text elsewhere.
            ax.text(c, r, f"{value:.2f}", ha="center", va="center",
                    color="black" if value > 0.6 else "white",
                    fontweight="bold" if is_trained else "normal")
            if is_trained:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False,
                                       edgecolor="red", linewidth=2.5))
    _save(fig, path)


def comparison(
    matrices: Mapping[str, ForgettingMatrix],
    path: str | os.PathLike,
    title: str = "Methods compared: which keeps more",
    references: Collection[str] = (),
    spread: Mapping[str, tuple[Mapping[str, float], ForgettingMatrix]] | None = None,
    summaries: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """Methods side by side: (a) grouped bars of their summary metrics (only those defined),
    (b) one panel per domain with each method's score after every stage, stages that trained
    the domain shaded. Higher is better for every metric except forgetting. `references` (the
    joint, multi-task upper bound) are drawn dashed, with their bars hatched. Over seeds,
    `matrices` and `summaries` are means and `spread` gives each method's standard deviations
    (of its summary, and cell by cell), drawn as error bars."""
    if not matrices:
        raise ValueError("comparison: no matrices given; pass {method: ForgettingMatrix}")
    methods = list(matrices)
    summaries = summaries or {m: summary(matrices[m]) for m in methods}
    spread = spread or {}
    metrics = [k for k in BAR_METRICS if any(k in s for s in summaries.values())]
    domains = list(dict.fromkeys(c for m in matrices.values() for c in m.columns))

    n_panel_cols = min(4, len(domains))
    n_panel_rows = math.ceil(len(domains) / n_panel_cols)
    fig = Figure(figsize=(3.4 * n_panel_cols + 0.6, 3.6 + 2.8 * n_panel_rows),
                 layout="constrained")
    grid = fig.add_gridspec(1 + n_panel_rows, n_panel_cols,
                            height_ratios=[1.3] + [1] * n_panel_rows)
    fig.suptitle(title)
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    first = matrices[methods[0]]  # its stages label the x axes of (b)

    _summary_bars(fig.add_subplot(grid[0, :]), methods, summaries, metrics, colours, references,
                  {m: s for m, (s, _) in spread.items()})
    for n, domain in enumerate(domains):
        ax = fig.add_subplot(grid[1 + n // n_panel_cols, n % n_panel_cols])
        _domain_panel(ax, matrices, domain, colours, first, references, {m: r for m, (_, r) in spread.items()})
        ax.set_title(f"{'(b) ' if n == 0 else ''}{ax.get_title()}", fontsize=10)
        if n % n_panel_cols == 0:
            ax.set_ylabel("score")
    key = ", ".join(f"{i} = {d}" for i, d in enumerate(first.stage_domains, start=1))
    fig.supxlabel(textwrap.fill(f"(b) score on each domain after each stage ({key}); "
                                "shaded: the stages trained on it", 160), fontsize=9)
    _save(fig, path)


def _summary_bars(bars, methods, summaries, metrics, colours, references=(), stds=None) -> None:
    """(a): grouped bars of the summary metrics, one group per metric, one bar per method (with
    `stds`, error bars of one standard deviation over seeds)."""
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(metrics))]
        ys = [summaries[m].get(k, math.nan) for k in metrics]  # NaN: no bar where undefined
        errors = [stds[m].get(k, 0.0) for k in metrics] if stds and m in stds else None
        drawn = bars.bar(xs, ys, width, label=f"{m} (reference)" if m in references else m, color=colours[m],
                         hatch="//" if m in references else None, yerr=errors, capsize=3 if errors else 0)
        bars.bar_label(drawn, fmt="%.3f", fontsize=8, padding=2)
    bars.axhline(0.0, color="grey", linewidth=0.8)
    bars.set_xticks(range(len(metrics)),
                    [f"{k}\n(lower is better)" if k == "forgetting" else k for k in metrics])
    bars.set_title("(a) summary metrics")
    bars.legend(loc="best", fontsize=8)
    bars.margins(y=0.2)


def _domain_panel(ax, matrices, domain: str, colours, first: ForgettingMatrix, references=(), stds=None) -> None:
    """(b): one domain's score after every stage, per method (with `stds`, error bars of one
    standard deviation over seeds); the stages that trained it shaded."""
    for m, mat in matrices.items():
        if domain in mat.columns:
            stages = range(len(mat.rows))
            scores = [mat.score(r, domain) for r in stages]
            ax.plot(stages, scores, marker="o", color=colours[m], label=m, linestyle="--" if m in references else "-")
            if stds and m in stds:  # the line keeps its label; the bars are drawn beside it
                ax.errorbar(stages, scores, yerr=[stds[m].score(r, domain) for r in stages], fmt="none",
                            ecolor=colours[m], capsize=3)
    # Shade, on the first method's stages, where this domain was trained.
    for i, d in enumerate(first.stage_domains, start=1):
        if d == domain:
            ax.axvspan(i - 0.4, i + 0.4, color="gold", alpha=0.25, linewidth=0)
    # Stage numbers, not "i:<domain>" labels: long domain names would overlap.
    ax.set_xticks(range(len(first.rows)), ["base", *map(str, range(1, len(first.rows)))])
    ax.set_ylim(-0.03, 1.03)  # room for markers at exactly 0 or 1
    ax.set_title(f"{domain}{'' if domain in first.stage_domains else ' (held out)'}")


def objective_vs_ratio(rows: list[dict], path: str | Path, title: str) -> None:
    """Objective against ratio, one series per granularity; trials stopped early hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    scored = [r for r in rows if r["objective"] != ""]
    for i, granularity in enumerate(sorted({r["granularity"] for r in scored})):
        points = sorted((float(r["ratio"]), float(r["objective"]), r["status"]) for r in scored
                        if r["granularity"] == granularity)
        done = [(x, y) for x, y, s in points if s == "finished"]
        colour = f"C{i % 10}"
        if done:
            ax.plot(*zip(*done, strict=True), marker="o", color=colour, label=granularity)
        early = [(x, y) for x, y, s in points if s != "finished"]
        if early:
            ax.scatter(*zip(*early, strict=True), facecolors="none", edgecolors=colour,
                       label=f"{granularity} (stopped early)")
    ax.set_xlabel("ratio (fraction trained per stage)")
    ax.set_ylabel("objective")
    ax.set_title(title)
    if scored:
        ax.legend(loc="best", fontsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
