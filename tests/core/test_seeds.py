"""Comparisons over seeds (hft_ray/core/seeds.py), against values computed by hand."""

import math

import pytest

from hft_ray.core.metrics import ForgettingMatrix
from hft_ray.core.seeds import compare, in_words, matrices_over_seeds, paired, summaries_over_seeds
from hft_ray.errors import UserError


def test_paired_differences_give_the_student_t_interval_and_the_sign_count():
    # d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.302653 -> half width 0.248414
    result = paired([0.6, 0.7, 0.9], [0.5, 0.5, 0.6])
    assert result.diff == pytest.approx(0.2)
    assert result.ci95 == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert (result.n, result.better, result.excludes_zero) == (3, 3, False)
    # d = 0.10, 0.12, 0.11, 0.09, 0.13: mean 0.11, sd 0.0158114, t(0.975, 4) = 2.776445 -> 0.019632
    tight = paired([0.60, 0.62, 0.61, 0.59, 0.63], [0.5] * 5)
    assert tight.ci95 == pytest.approx((0.11 - 0.019632, 0.11 + 0.019632), abs=1e-6)
    assert tight.excludes_zero and tight.to_json() == {"diff": tight.diff, "ci95": list(tight.ci95), "n": 5,
                                                        "better": 5}


def test_lower_is_better_for_forgetting_and_one_seed_has_no_interval():
    assert paired([0.1, 0.3], [0.2, 0.2], higher_is_better=False).better == 1
    single = paired([0.4], [0.3])
    assert single.ci95 is None and single.to_json()["ci95"] is None and not single.excludes_zero
    with pytest.raises(UserError):
        paired([0.1, 0.2], [0.1])


def test_matrices_and_summaries_are_averaged_cell_by_cell_with_the_sample_std():
    a = ForgettingMatrix.build(["x", "y"], ["x"], [[0.0, 0.2], [1.0, 0.4]])
    b = ForgettingMatrix.build(["x", "y"], ["x"], [[0.0, 0.4], [0.8, 0.4]])
    mean, std = matrices_over_seeds([a, b])
    assert [v for row in mean.scores for v in row] == pytest.approx([0.0, 0.3, 0.9, 0.4])
    assert std.scores[1][0] == pytest.approx(math.sqrt(0.02)) and std.scores[1][1] == 0.0
    means, stds = summaries_over_seeds([{"OP": 0.5, "BWT": -0.2}, {"OP": 0.7}])
    assert means == pytest.approx({"OP": 0.6}) and stds == pytest.approx({"OP": math.sqrt(0.02)})
    with pytest.raises(UserError, match="other rows or columns"):
        matrices_over_seeds([a, ForgettingMatrix.build(["x"], ["x"], [[0.0], [1.0]])])


def test_every_method_is_compared_with_the_reference_over_the_seeds_both_define_a_metric_for():
    per_seed = {0: {"fft": {"OP": 0.5, "BWT": -0.4}, "hft": {"OP": 0.6, "BWT": -0.2}},
                1: {"fft": {"OP": 0.5, "BWT": -0.5}, "hft": {"OP": 0.4, "BWT": -0.3}},
                2: {"fft": {"OP": 0.6}, "hft": {"OP": 0.8, "BWT": -0.1}}}
    result = compare(per_seed, "fft")
    assert set(result) == {"hft"} and set(result["hft"]) == {"OP", "BWT"}
    assert result["hft"]["OP"].diff == pytest.approx((0.1 - 0.1 + 0.2) / 3) and result["hft"]["OP"].better == 2
    assert result["hft"]["BWT"].n == 2 and result["hft"]["BWT"].diff == pytest.approx(0.2)
    line = in_words("hft", "fft", "BWT", result["hft"]["BWT"])
    assert line.startswith("hft's BWT is 0.200 higher than fft's (95% CI") and "better in 2 of 2 seeds" in line
    assert line.endswith("the interval excludes 0"), line  # 0.2 in both seeds: no spread
    assert in_words("hft", "fft", "OP", result["hft"]["OP"]).endswith("includes 0: no difference shown")
