"""The branch scheduler (the DAG's decisions) driven by hand: no Ray, no training."""

import pytest

from hft_ray.run.scheduler import BaseEvaluated, Branch, BranchEnded, Evaluate, Launch, Scheduler, StageEvaluated
from hft_ray.train.events import StageTrained

ROW = {"upper": {"exact_match": 1.0}}


def trained(branch: str, stage: int) -> StageTrained:
    return StageTrained(branch, stage, f"/ckpt/{branch}/{stage}", [1.0], 1.0, 0.1, 1, 2)


def test_a_new_run_evaluates_the_base_and_launches_as_many_branches_as_fit():
    scheduler = Scheduler([Branch("fft"), Branch("hft"), Branch("lora")], stages=2, slots=2, base="/base")
    assert scheduler.start() == [Evaluate(None, 0, "/base"), Launch("fft", 1, "/base"), Launch("hft", 1, "/base")]
    assert scheduler.waiting() == ["lora"]


def test_each_trained_stage_is_evaluated_once_even_when_heard_twice():
    scheduler = Scheduler([Branch("hft")], stages=2, slots=1, base="/base")
    scheduler.start()
    assert scheduler.on(trained("hft", 1)) == [Evaluate("hft", 1, "/ckpt/hft/1")]
    assert scheduler.on(trained("hft", 1)) == [], "a restarted worker group tells the driver again"


def test_a_waiting_branch_starts_when_a_running_one_ends():
    scheduler = Scheduler([Branch("fft"), Branch("hft")], stages=1, slots=1, base="/base")
    assert scheduler.start() == [Evaluate(None, 0, "/base"), Launch("fft", 1, "/base")]
    scheduler.on(trained("fft", 1))
    assert scheduler.on(BranchEnded("fft")) == [Launch("hft", 1, "/base")]


def test_done_needs_row_0_every_row_and_every_branch_ended():
    scheduler = Scheduler([Branch("hft")], stages=2, slots=1, base="/base")
    scheduler.start()
    for event in (trained("hft", 1), trained("hft", 2), StageEvaluated("hft", 1, ROW), StageEvaluated("hft", 2, ROW)):
        scheduler.on(event)
        assert not scheduler.done
    scheduler.on(BranchEnded("hft"))
    assert not scheduler.done, "row 0 is missing"
    scheduler.on(BaseEvaluated(ROW))
    assert scheduler.done


def test_a_resumed_run_evaluates_what_was_trained_and_goes_on_from_the_next_stage():
    done = Branch("fft", trained={1: "/c/fft/1", 2: "/c/fft/2"}, rows={1: ROW})
    finished = Branch("hft", trained={1: "/c/hft/1", 2: "/c/hft/2", 3: "/c/hft/3"}, rows={1: ROW, 2: ROW, 3: ROW})
    fresh = Branch("lora")
    scheduler = Scheduler([done, finished, fresh], stages=3, slots=2, base="/base", base_row=ROW)
    assert scheduler.start() == [Evaluate("fft", 2, "/c/fft/2"), Launch("fft", 3, "/c/fft/2"),
                                 Launch("lora", 1, "/base")]
    assert finished.state == "ended", "a branch with every stage trained is not launched again"


def test_a_branch_that_ends_short_of_its_stages_is_an_error():
    scheduler = Scheduler([Branch("hft")], stages=2, slots=1, base="/base")
    scheduler.start()
    scheduler.on(trained("hft", 1))
    with pytest.raises(RuntimeError, match="ended after 1 of 2 stages"):
        scheduler.on(BranchEnded("hft"))
