"""The branch scheduler (the DAG's decisions) driven by hand: no Ray, no training."""

import pytest

from hft_ray.run.scheduler import (
    Base,
    BaseEvaluated,
    Branch,
    BranchEnded,
    Evaluate,
    Launch,
    Pretrain,
    Scheduler,
    StageEvaluated,
)
from hft_ray.train.events import StageTrained

ROW = {"upper": {"exact_match": 1.0}}


def trained(branch: str, stage: int) -> StageTrained:
    return StageTrained(branch, stage, f"/ckpt/{branch}/{stage}", [1.0], 1.0, 0.1, 1, 2)


def test_a_new_run_evaluates_the_base_and_launches_as_many_branches_as_fit():
    scheduler = Scheduler([Branch("fft"), Branch("hft"), Branch("lora")], stages=2, slots=2, bases=[Base("", "/base")])
    assert scheduler.start() == [Evaluate(None, 0, "/base"), Launch("fft", 1, "/base"), Launch("hft", 1, "/base")]
    assert scheduler.waiting() == ["lora"]


def test_each_trained_stage_is_evaluated_once_even_when_heard_twice():
    scheduler = Scheduler([Branch("hft")], stages=2, slots=1, bases=[Base("", "/base")])
    scheduler.start()
    assert scheduler.on(trained("hft", 1)) == [Evaluate("hft", 1, "/ckpt/hft/1")]
    assert scheduler.on(trained("hft", 1)) == [], "a restarted worker group tells the driver again"


def test_a_waiting_branch_starts_when_a_running_one_ends():
    scheduler = Scheduler([Branch("fft"), Branch("hft")], stages=1, slots=1, bases=[Base("", "/base")])
    assert scheduler.start() == [Evaluate(None, 0, "/base"), Launch("fft", 1, "/base")]
    scheduler.on(trained("fft", 1))
    assert scheduler.on(BranchEnded("fft")) == [Launch("hft", 1, "/base")]


def test_done_needs_row_0_every_row_and_every_branch_ended():
    scheduler = Scheduler([Branch("hft")], stages=2, slots=1, bases=[Base("", "/base")])
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
    scheduler = Scheduler([done, finished, fresh], stages=3, slots=2, bases=[Base("", "/base", row=ROW)])
    assert scheduler.start() == [Evaluate("fft", 2, "/c/fft/2"), Launch("fft", 3, "/c/fft/2"),
                                 Launch("lora", 1, "/base")]
    assert finished.state == "ended", "a branch with every stage trained is not launched again"


def test_a_branch_that_ends_short_of_its_stages_is_an_error():
    scheduler = Scheduler([Branch("hft")], stages=2, slots=1, bases=[Base("", "/base")])
    scheduler.start()
    scheduler.on(trained("hft", 1))
    with pytest.raises(RuntimeError, match="ended after 1 of 2 stages"):
        scheduler.on(BranchEnded("hft"))


def pretrained(job: str) -> StageTrained:
    return StageTrained(job, 0, f"/{job}/base", [1.0], 1.0, 0.1, 1, 2)


def test_branches_wait_for_their_base_pretrained_in_a_worker_group_of_its_own():
    base = Base("", "/run/base", "pretrain", pretrain_from="/run/init")
    scheduler = Scheduler([Branch("fft"), Branch("hft")], stages=1, slots=2, bases=[base])
    assert scheduler.start() == [Pretrain("", "/run/init")], "no branch starts before its base exists"
    assert scheduler.waiting() == ["fft", "hft"]
    assert scheduler.on(pretrained("pretrain")) == [Evaluate(None, 0, "/pretrain/base", "")]
    assert scheduler.on(pretrained("pretrain")) == [], "heard again after a restart: evaluated once"
    # the pretraining group holds its slot until it ends: then both branches start from the base
    assert scheduler.on(BranchEnded("pretrain")) == [Launch("fft", 1, "/pretrain/base"),
                                                     Launch("hft", 1, "/pretrain/base")]


def test_with_a_base_per_seed_a_seed_goes_on_as_soon_as_its_own_base_is_ready():
    bases = [Base(f"seed-{s}", f"/s{s}/base", f"pretrain@{s}", pretrain_from=f"/s{s}/init") for s in (0, 1)]
    branches = [Branch(f"{m}@{s}", base=f"seed-{s}") for s in (0, 1) for m in ("fft", "hft")]
    scheduler = Scheduler(branches, stages=1, slots=2, bases=bases)
    assert scheduler.start() == [Pretrain("seed-0", "/s0/init"), Pretrain("seed-1", "/s1/init")]
    scheduler.on(pretrained("pretrain@1"))
    assert scheduler.on(BranchEnded("pretrain@1")) == [Launch("fft@1", 1, "/pretrain@1/base")], \
        "seed 1's branches start from seed 1's base; seed 0 still pretrains in the other slot"
    scheduler.on(pretrained("pretrain@0"))
    assert scheduler.on(BranchEnded("pretrain@0")) == [Launch("fft@0", 1, "/pretrain@0/base")]
    scheduler.on(trained("fft@1", 1))
    assert scheduler.on(BranchEnded("fft@1")) == [Launch("hft@0", 1, "/pretrain@0/base")], "in the order listed"


def test_a_scheduler_of_bases_alone_is_done_once_every_base_is_evaluated():
    """A Tune search makes its bases so, before any trial."""
    scheduler = Scheduler([], stages=2, slots=1, bases=[Base("seed-0", "/s0/base"), Base("seed-1", "/s1/base")])
    assert scheduler.start() == [Evaluate(None, 0, "/s0/base", "seed-0"), Evaluate(None, 0, "/s1/base", "seed-1")]
    scheduler.on(BaseEvaluated(ROW, base="seed-1"))
    assert not scheduler.done
    scheduler.on(BaseEvaluated(ROW, base="seed-0"))
    assert scheduler.done
