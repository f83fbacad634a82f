"""What the driver does next, from what has happened: the DAG of docs/design.md as plain
logic, with no Ray in it (the runner carries the actions out; tests drive it by hand).

    each branch: launch its worker group (as many at once as `slots` allow; the rest wait)
      -> stage i trained -> evaluate stage i's checkpoint (while stage i+1 trains) -> row i
    base checkpoint -> evaluate it (row 0)
    done: row 0 and every branch's rows, and every launched branch ended

A base that must still be pretrained is stage 0 of the first branch launched: its worker group
pretrains, then goes on with its own stages, while the other branches' groups start beside it
and wait for the base checkpoint (so no worker group starts twice on the way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hft_ray.train.events import StageTrained

Row = dict[str, dict[str, float]]  # domain -> metric -> score


# -- what happens (besides the workers' own events, hft_ray/train/events.py) -------------------

@dataclass(frozen=True)
class BaseEvaluated:
    row: Row
    node: str = ""             # the Ray node that evaluated it
    reports: dict = field(default_factory=dict)  # lm-evaluation-harness's results, by column


@dataclass(frozen=True)
class StageEvaluated:
    branch: str
    stage: int
    row: Row
    node: str = ""             # the Ray node that evaluated it
    reports: dict = field(default_factory=dict)  # lm-evaluation-harness's results, by column


@dataclass(frozen=True)
class BranchEnded:
    branch: str


@dataclass(frozen=True)
class BranchFailed:
    branch: str
    reason: str


# -- what to do ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    branch: str
    first: int                 # the first stage to train (0: pretrain the base first)
    start: str                 # the checkpoint it starts from
    wait_for_start: bool = False  # another branch is pretraining `start`


@dataclass(frozen=True)
class Evaluate:
    branch: str | None         # None: the base model
    stage: int
    checkpoint: str


@dataclass
class Branch:
    name: str
    trained: dict[int, str] = field(default_factory=dict)   # stage -> checkpoint
    rows: dict[int, Row] = field(default_factory=dict)
    state: str = "waiting"     # waiting -> running -> ended


class Scheduler:
    def __init__(self, branches: list[Branch], stages: int, slots: int, base: str, base_row: Row | None = None,
                 pretrain_from: str | None = None):
        """`branches` may hold what an earlier attempt finished (trained stages, rows).
        `pretrain_from`: the checkpoint the base is still to be pretrained from, into `base`."""
        self.branches = {b.name: b for b in branches}
        self.stages, self.slots, self.base, self.base_row = stages, max(1, slots), base, base_row
        self.pretrain_from = pretrain_from
        self.pretraining = False   # a launched branch is pretraining the base

    def start(self) -> list[Launch | Evaluate]:
        actions: list[Launch | Evaluate] = [] if self.base_row or self.pretrain_from else [Evaluate(None, 0, self.base)]
        for branch in self.branches.values():
            actions += [Evaluate(branch.name, i, c) for i, c in sorted(branch.trained.items()) if i not in branch.rows]
            if len(branch.trained) == self.stages:
                branch.state = "ended"
        return actions + self._launch()

    def on(self, event) -> list[Launch | Evaluate]:
        if isinstance(event, BaseEvaluated):
            self.base_row = event.row
        elif isinstance(event, StageTrained) and event.stage == 0:
            self.pretrain_from, self.pretraining = None, False
            return [Evaluate(None, 0, event.checkpoint)]
        elif isinstance(event, StageTrained):
            branch = self.branches[event.branch]
            if event.stage not in branch.trained:  # else: heard again after a restart
                branch.trained[event.stage] = event.checkpoint
                return [Evaluate(branch.name, event.stage, event.checkpoint)]
        elif isinstance(event, StageEvaluated):
            self.branches[event.branch].rows[event.stage] = event.row
        elif isinstance(event, BranchEnded):
            branch = self.branches[event.branch]
            if len(branch.trained) < self.stages:
                raise RuntimeError(f"branch {branch.name} ended after {len(branch.trained)} of {self.stages} stages")
            branch.state = "ended"
            return self._launch()
        return []

    def _launch(self) -> list[Launch]:
        running = sum(b.state == "running" for b in self.branches.values())
        actions = []
        for branch in self.branches.values():
            if branch.state == "waiting" and running < self.slots:
                branch.state, running = "running", running + 1
                actions.append(self._launch_one(branch))
        return actions

    def _launch_one(self, branch: Branch) -> Launch:
        first = len(branch.trained) + 1
        if first > 1:
            return Launch(branch.name, first, branch.trained[first - 1])
        if self.pretrain_from and not self.pretraining:
            self.pretraining = True
            return Launch(branch.name, 0, self.pretrain_from)
        return Launch(branch.name, 1, self.base, wait_for_start=self.pretrain_from is not None)

    def waiting(self) -> list[str]:
        return [b.name for b in self.branches.values() if b.state == "waiting"]

    @property
    def done(self) -> bool:
        return self.base_row is not None and all(
            b.state == "ended" and len(b.rows) == self.stages for b in self.branches.values())
