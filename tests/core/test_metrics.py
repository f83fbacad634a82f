"""Forgetting matrix and metrics: every expected value is worked out by hand in a comment."""

import json
import math

import pytest

from hft_ray.core.metrics import ForgettingMatrix, summary
from hft_ray.errors import UserError


def approx(expected: dict) -> dict:
    return pytest.approx(expected, abs=1e-12)


def test_one_stage_has_only_op_and_heldout_delta():
    m = ForgettingMatrix.build(["a", "h"], ["a"], [[0.2, 0.5], [0.8, 0.4]])
    # OP = R1[a] = 0.8; heldout_delta = R1[h] - R0[h] = 0.4 - 0.5 = -0.1.
    # BWT, FWT and forgetting need T >= 2: left out, not 0.
    assert summary(m) == approx({"OP": 0.8, "heldout_delta": -0.1})


def test_two_stages():
    m = ForgettingMatrix.build(["a", "b"], ["a", "b"], [[0.1, 0.2], [0.7, 0.3], [0.5, 0.9]])
    # OP = (R2[a] + R2[b]) / 2 = (0.5 + 0.9) / 2 = 0.7
    # BWT = R2[a] - R1[a] = 0.5 - 0.7 = -0.2
    # FWT = R1[b] - R0[b] = 0.3 - 0.2 = 0.1
    # forgetting = max(R0[a], R1[a]) - R2[a] = max(0.1, 0.7) - 0.5 = 0.2
    # no held-out column: heldout_delta left out
    assert summary(m) == approx({"OP": 0.7, "BWT": -0.2, "FWT": 0.1, "forgetting": 0.2})


def test_three_stages_with_a_held_out_domain():
    m = ForgettingMatrix.build(
        ["a", "b", "c", "h"],
        ["a", "b", "c"],
        [
            [0.2, 0.3, 0.1, 0.6],  # base
            [0.8, 0.4, 0.2, 0.5],  # after a
            [0.6, 0.9, 0.3, 0.5],  # after b
            [0.5, 0.7, 0.8, 0.4],  # after c
        ],
    )
    # OP = (0.5 + 0.7 + 0.8) / 3 = 2/3
    # BWT = ((R3[a] - R1[a]) + (R3[b] - R2[b])) / 2 = ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = -0.25
    # FWT = ((R1[b] - R0[b]) + (R2[c] - R0[c])) / 2 = ((0.4 - 0.3) + (0.3 - 0.1)) / 2 = 0.15
    # forgetting: a: max(0.2, 0.8, 0.6) - 0.5 = 0.3; b: max(0.3, 0.4, 0.9) - 0.7 = 0.2;
    #   mean = 0.25 (c is trained at T, so it is not "trained before T")
    # heldout_delta = R3[h] - R0[h] = 0.4 - 0.6 = -0.2
    assert summary(m) == approx(
        {"OP": 2 / 3, "BWT": -0.25, "FWT": 0.15, "forgetting": 0.25, "heldout_delta": -0.2}
    )


def test_forgetting_counts_the_base_row():
    # Training on a lowered a (0.9 -> 0.6): the best earlier score is the base model's.
    m = ForgettingMatrix.build(["a", "b"], ["a", "b"], [[0.9, 0.2], [0.6, 0.3], [0.5, 0.9]])
    # forgetting = max(R0[a], R1[a]) - R2[a] = max(0.9, 0.6) - 0.5 = 0.4 (not 0.6 - 0.5 = 0.1)
    assert summary(m)["forgetting"] == pytest.approx(0.4)


def test_a_domain_trained_twice_counts_at_its_last_stage():
    m = ForgettingMatrix.build(
        ["a", "b", "h"],
        ["a", "b", "a"],
        [
            [0.1, 0.2, 0.5],  # base
            [0.6, 0.3, 0.5],  # 1:a
            [0.4, 0.8, 0.4],  # 2:b
            [0.9, 0.6, 0.3],  # 3:a
        ],
    )
    assert m.rows == ("base", "1:a", "2:b", "3:a")
    # OP over distinct trained domains {a, b} = (0.9 + 0.6) / 2 = 0.75
    # BWT: stage 1 (a) is retrained at 3, so only stage 2 (b): R3[b] - R2[b] = 0.6 - 0.8 = -0.2,
    #   averaged over that one term (not over T-1 = 2)
    # FWT: stage 2 trains b first: R1[b] - R0[b] = 0.3 - 0.2 = 0.1; stage 3 repeats a: skipped
    # forgetting: only b's last stage (2) is < T = 3: max(0.2, 0.3, 0.8) - 0.6 = 0.2
    # heldout_delta = R3[h] - R0[h] = 0.3 - 0.5 = -0.2
    assert summary(m) == approx(
        {"OP": 0.75, "BWT": -0.2, "FWT": 0.1, "forgetting": 0.2, "heldout_delta": -0.2}
    )


def test_one_domain_retrained_leaves_only_op():
    m = ForgettingMatrix.build(["a"], ["a", "a"], [[0.1], [0.5], [0.7]])
    # OP = R2[a] = 0.7; stage 1's domain is retrained (no BWT term), stage 2 is a repeat (no FWT
    # term), no domain's last stage is < T (no forgetting), no held-out column.
    assert summary(m) == approx({"OP": 0.7})


def test_dict_json_round_trip_and_csv():
    m = ForgettingMatrix.build(["a", "b"], ["a", "b"], [[0.1, 0.2], [0.7, 0.3], [0.5, 0.9]])
    d = m.to_dict()
    assert d == {
        "columns": ["a", "b"],
        "rows": ["base", "1:a", "2:b"],
        "stage_domains": ["a", "b"],
        "scores": [[0.1, 0.2], [0.7, 0.3], [0.5, 0.9]],
    }
    assert ForgettingMatrix.from_dict(json.loads(json.dumps(d))) == m
    assert m.to_csv() == "row,a,b\nbase,0.1,0.2\n1:a,0.7,0.3\n2:b,0.5,0.9\n"
    assert m.score(2, "b") == 0.9


@pytest.mark.parametrize(
    "columns, stages, scores, message",
    [
        (["a"], ["a"], [[0.1]], "need T+1 = 2"),
        (["a", "b"], ["a"], [[0.1, 0.2], [0.3]], "scores[1]: 1 values; need one per column (2)"),
        (["a"], ["a"], [[0.1], [1.2]], "scores[1]: [1.2] not a number in [0, 1]"),
        (["a"], ["a"], [[-0.1], [0.2]], "scores[0]: [-0.1] not a number in [0, 1]"),
        (["a"], ["a"], [[math.nan], [0.2]], "scores[0]: [nan]"),
        (["a"], ["x"], [[0.1], [0.2]], "stage_domains: ['x'] not among the columns ['a']"),
        (["a", "a"], ["a"], [[0.1, 0.1], [0.2, 0.2]], "has duplicates"),
        (["a"], [], [[0.1]], "at least one stage"),
    ],
)
def test_invalid_matrices_are_rejected(columns, stages, scores, message):
    with pytest.raises(ValueError) as info:
        ForgettingMatrix.build(columns, stages, scores)
    assert message in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(UserError) as info:
        ForgettingMatrix.build(["a"], ["x"], [[2.0]])
    assert len(info.value.problems) == 3  # unknown stage domain, row count, out-of-range score


def test_from_dict_checks_row_labels_and_keys():
    d = ForgettingMatrix.build(["a"], ["a"], [[0.1], [0.2]]).to_dict()
    with pytest.raises(UserError, match=r"rows: \['base', 'one'\] should be \['base', '1:a'\]"):
        ForgettingMatrix.from_dict({**d, "rows": ["base", "one"]})
    with pytest.raises(UserError, match="missing key"):
        ForgettingMatrix.from_dict({"columns": ["a"]})
