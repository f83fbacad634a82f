"""`output.keep`: a stage's checkpoint goes only once it is evaluated and the next stage has
written its own (it starts from it, and a resumed DPO stage takes it as its reference)."""

import pytest

from hft_ray.run.retention import releasable


@pytest.mark.parametrize("trained,evaluated,keep,expected", [
    ({1, 2, 3}, {1, 2, 3}, "all", []),
    ({1, 2, 3}, {1, 2, 3}, "last", [1, 2]),
    ({1, 2, 3}, {1, 2, 3}, "none", [1, 2, 3]),
    ({1, 2}, {1, 2}, "last", [1]),          # stage 3 not written yet: stage 2 is what it starts from
    ({1, 2}, {2}, "none", []),               # stage 1 not evaluated yet; stage 2 waits for stage 3
    ({1}, {1}, "none", []),                  # stage 2 starts from it
    ({1, 2, 3}, {1, 3}, "last", [1]),        # stage 2 not evaluated yet
])
def test_a_checkpoint_goes_once_evaluated_and_once_the_next_stage_has_its_own(trained, evaluated, keep, expected):
    assert releasable(trained, evaluated, 3, keep) == expected
