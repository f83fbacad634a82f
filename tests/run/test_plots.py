"""Figures are written as real PNGs that show the matrices they are given: the Figure each
function builds is read back (cells, tick labels, annotations, bars, lines), and the PNG is
decoded (its size, and the heatmap's cell colours sampled from the pixels)."""

import math

import matplotlib
import numpy as np
import pytest
from matplotlib.image import imread

from hft_ray.core.metrics import ForgettingMatrix, summary
from hft_ray.run import plots
from hft_ray.run.plots import comparison, heatmap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def matrix(stage_scores):
    """Domains a, b, c trained in order, h held out; rows from `stage_scores` after the base."""
    return ForgettingMatrix.build(
        ["a", "b", "c", "h"], ["a", "b", "c"], [[0.2, 0.3, 0.1, 0.6], *stage_scores]
    )


HFT = matrix([[0.8, 0.4, 0.2, 0.6], [0.7, 0.9, 0.3, 0.6], [0.7, 0.8, 0.8, 0.55]])
FFT = matrix([[0.85, 0.4, 0.2, 0.5], [0.5, 0.9, 0.3, 0.4], [0.3, 0.6, 0.85, 0.35]])


@pytest.fixture
def figures(monkeypatch):
    """The Figures the plot functions save, in order (each one still written to its path)."""
    saved, save = [], plots._save

    def keep(fig, path):
        save(fig, path)
        saved.append(fig)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def decoded(path, fig):
    """The PNG as an RGBA array, checked to be a PNG of the Figure's size at 100 dpi."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    width, height = fig.get_size_inches() * 100
    assert pixels.shape == (round(height), round(width), 4)
    return pixels


def texts(ax):
    return [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]


def check_heatmap(path, fig, m: ForgettingMatrix, title: str):
    pixels = decoded(path, fig)
    ax = fig.axes[0]
    assert ax.get_title() == title and ax.get_xlabel() == "evaluated on" and ax.get_ylabel() == "after stage"
    assert texts(ax) == (list(m.columns), list(m.rows))
    [image] = ax.get_images()
    assert np.array_equal(np.asarray(image.get_array()), np.array(m.scores))
    assert image.get_clim() == (0.0, 1.0)
    trained = {(m.columns.index(d), r) for r, d in enumerate(m.stage_domains, start=1)}
    # One annotation per cell, the cell's value, bold where the row's stage trained the column.
    cells = {(t.get_position()[0], t.get_position()[1]): t for t in ax.texts}
    assert set(cells) == {(c, r) for r in range(len(m.rows)) for c in range(len(m.columns))}
    for (c, r), text in cells.items():
        assert text.get_text() == f"{m.scores[r][c]:.2f}"
        assert (text.get_fontweight() == "bold") == ((c, r) in trained), (c, r)
    boxes = {(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches
             if matplotlib.colors.same_color(p.get_edgecolor(), "red")}
    assert boxes == trained
    # The pixels: each cell is drawn in viridis at its value (sampled off the text and the box).
    viridis, height = matplotlib.colormaps["viridis"], pixels.shape[0]
    for r, row in enumerate(m.scores):
        for c, value in enumerate(row):
            x, y = ax.transData.transform((c - 0.3, r - 0.3))
            drawn = pixels[height - 1 - int(y), int(x), :3]
            assert np.abs(drawn - np.array(viridis(value)[:3])).max() < 0.02, (r, c, drawn, viridis(value))


def test_heatmap_of_a_4x4_matrix(tmp_path, figures):
    path = tmp_path / "hft.png"
    heatmap(HFT, "HFT on a, b, c", path)
    check_heatmap(path, figures[0], HFT, "HFT on a, b, c")


def test_heatmap_of_one_stage_and_one_domain(tmp_path, figures):
    path = tmp_path / "tiny.png"
    tiny = ForgettingMatrix.build(["a"], ["a"], [[0.0], [1.0]])
    heatmap(tiny, "tiny", path)
    check_heatmap(path, figures[0], tiny, "tiny")


def bars_by_method(ax) -> dict[str, list[float]]:
    """(a)'s bar heights, per method (legend order = the order the bars were drawn)."""
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    return {label: [bar.get_height() for bar in container]
            for label, container in zip(labels, ax.containers, strict=True)}


def test_comparison_of_two_methods(tmp_path, figures):
    path = tmp_path / "comparison.png"
    comparison({"HFT": HFT, "FFT": FFT}, path, title="HFT vs FFT")
    fig = figures[0]
    decoded(path, fig)
    assert fig.get_suptitle() == "HFT vs FFT"
    bars, *panels = fig.axes
    metrics = ["OP", "BWT", "FWT", "forgetting", "heldout_delta"]
    assert texts(bars)[0] == ["OP", "BWT", "FWT", "forgetting\n(lower is better)", "heldout_delta"]
    heights = bars_by_method(bars)
    for method, m in (("HFT", HFT), ("FFT", FFT)):
        assert heights[method] == pytest.approx([summary(m)[k] for k in metrics]), method
    # (b): a panel per domain, each method's score on it after every stage, its training stage shaded.
    assert [ax.get_title() for ax in panels] == ["(b) a", "b", "c", "h (held out)"]
    for ax, domain in zip(panels, "abch", strict=True):
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert lines == {name: [row[m.columns.index(domain)] for row in m.scores]
                         for name, m in (("HFT", HFT), ("FFT", FFT))}
        spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
        stage = HFT.stage_domains.index(domain) + 1 if domain in HFT.stage_domains else None
        assert spans == ([] if stage is None else [pytest.approx((stage - 0.4, stage + 0.4))]), domain
        assert texts(ax)[0] == ["base", "1", "2", "3"]


def test_comparison_with_one_stage_leaves_undefined_metrics_out(tmp_path, figures):
    # T = 1: only OP and heldout_delta are defined; the figure is still drawn, with those two bars.
    one = ForgettingMatrix.build(["a", "h"], ["a"], [[0.2, 0.5], [0.8, 0.4]])
    path = tmp_path / "one.png"
    comparison({"HFT": one}, path)
    fig = figures[0]
    decoded(path, fig)
    bars = fig.axes[0]
    assert texts(bars)[0] == ["OP", "heldout_delta"]
    assert bars_by_method(bars) == {"HFT": pytest.approx([0.8, 0.4 - 0.5])}
    assert not any(math.isnan(h) for h in bars_by_method(bars)["HFT"])


def test_a_metric_one_method_lacks_gets_no_bar_and_a_domain_it_lacks_no_line(tmp_path, figures):
    # Without the held-out column, heldout_delta is undefined for `seen`: no bar (NaN), never a 0.
    seen = ForgettingMatrix.build(["a", "b", "c"], ["a", "b", "c"], [row[:3] for row in FFT.scores])
    comparison({"HFT": HFT, "seen": seen}, tmp_path / "mixed.png")
    bars, *panels = figures[0].axes
    assert texts(bars)[0][-1] == "heldout_delta"
    heights = bars_by_method(bars)
    assert heights["HFT"][-1] == pytest.approx(summary(HFT)["heldout_delta"]) and math.isnan(heights["seen"][-1])
    assert heights["seen"][:-1] == pytest.approx(heights_of(summary(FFT))[:-1])
    assert [line.get_label() for line in panels[-1].get_lines()] == ["HFT"]


def heights_of(metrics: dict) -> list[float]:
    return [metrics[k] for k in ("OP", "BWT", "FWT", "forgetting", "heldout_delta")]


def test_comparison_needs_a_matrix(tmp_path):
    with pytest.raises(ValueError, match="no matrices"):
        comparison({}, tmp_path / "none.png")


def test_over_seeds_the_comparison_draws_one_standard_deviation_as_error_bars(tmp_path, figures):
    from hft_ray.core.metrics import ForgettingMatrix

    spread = ForgettingMatrix(HFT.columns, HFT.rows, HFT.stage_domains,
                              tuple(tuple(0.01 * (i + 1) for _ in HFT.columns) for i in range(len(HFT.rows))))
    stds = {"OP": 0.05, "BWT": 0.1}
    comparison({"HFT": HFT, "FFT": FFT}, tmp_path / "c.png", spread={"HFT": (stds, spread)})
    bars, first, *_ = figures[0].axes
    hft = next(c for c in bars.containers if c.get_label() == "HFT")
    assert hft.errorbar is not None, "the HFT bars carry their deviations"
    whiskers = hft.errorbar.lines[2][0].get_segments()
    assert [seg[1][1] - seg[0][1] for seg in whiskers[:2]] == pytest.approx([0.10, 0.20]), "+-1 std: OP, BWT"
    assert next(c for c in bars.containers if c.get_label() == "FFT").errorbar is None
    caps = [c for c in first.collections if c.get_segments()]
    assert [seg[1][1] - seg[0][1] for seg in caps[0].get_segments()] == pytest.approx([0.02, 0.04, 0.06, 0.08])
    assert {line.get_label() for line in first.get_lines() if not line.get_label().startswith("_")} == {"HFT", "FFT"}
