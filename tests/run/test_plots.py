"""Figures are written as real PNGs, for one method and for a comparison of methods."""

import pytest

from hft_ray.core.metrics import ForgettingMatrix
from hft_ray.run.plots import comparison, heatmap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # a blank or failed canvas is a few hundred bytes


def matrix(stage_scores):
    """Domains a, b, c trained in order, h held out; rows from `stage_scores` after the base."""
    return ForgettingMatrix.build(
        ["a", "b", "c", "h"], ["a", "b", "c"], [[0.2, 0.3, 0.1, 0.6], *stage_scores]
    )


HFT = matrix([[0.8, 0.4, 0.2, 0.6], [0.7, 0.9, 0.3, 0.6], [0.7, 0.8, 0.8, 0.55]])
FFT = matrix([[0.85, 0.4, 0.2, 0.5], [0.5, 0.9, 0.3, 0.4], [0.3, 0.6, 0.85, 0.35]])


def test_heatmap_of_a_4x4_matrix(tmp_path):
    path = tmp_path / "hft.png"
    heatmap(HFT, "HFT on a, b, c", path)
    assert_png(path)


def test_heatmap_of_one_stage_and_one_domain(tmp_path):
    path = tmp_path / "tiny.png"
    heatmap(ForgettingMatrix.build(["a"], ["a"], [[0.0], [1.0]]), "tiny", path)
    assert_png(path)


def test_comparison_of_two_methods(tmp_path):
    path = tmp_path / "comparison.png"
    comparison({"HFT": HFT, "FFT": FFT}, path, title="HFT vs FFT")
    assert_png(path)


def test_comparison_with_one_stage_leaves_undefined_metrics_out(tmp_path):
    # T = 1: only OP and heldout_delta are defined; the figure is still drawn.
    one = ForgettingMatrix.build(["a", "h"], ["a"], [[0.2, 0.5], [0.8, 0.4]])
    path = tmp_path / "one.png"
    comparison({"HFT": one}, path)
    assert_png(path)


def test_comparison_needs_a_matrix(tmp_path):
    with pytest.raises(ValueError, match="no matrices"):
        comparison({}, tmp_path / "none.png")
