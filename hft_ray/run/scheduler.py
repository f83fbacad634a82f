"""What the driver does next, from what has happened: the DAG of docs/design.md as plain
logic, with no Ray in it (the runner carries the actions out; tests drive it by hand).

    each base: ready (built or loaded), or pretrained in a worker group of its own -> evaluate it (row 0)
    each branch, once its base is ready: launch its worker group (as many groups at once as
      `slots` allow; the rest wait) -> stage i trained -> evaluate stage i's checkpoint (while
      stage i+1 trains) -> row i
    done: every base's row and every branch's rows, and every launched group ended

A run has one base, or one per seed (hft_ray/run/layout.py); a Tune search makes its bases with a
scheduler of no branches before its trials start.
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
    base: str = ""             # which base (hft_ray/run/layout.py)


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
    first: int                 # the first stage to train
    start: str                 # the checkpoint it starts from


@dataclass(frozen=True)
class Pretrain:
    base: str                  # the base's key
    start: str                 # the checkpoint pretraining starts from


@dataclass(frozen=True)
class Evaluate:
    branch: str | None         # None: a base model
    stage: int
    checkpoint: str
    base: str = ""             # with branch None: which base


@dataclass
class Branch:
    name: str
    trained: dict[int, str] = field(default_factory=dict)   # stage -> checkpoint
    rows: dict[int, Row] = field(default_factory=dict)
    state: str = "waiting"     # waiting -> running -> ended
    base: str = ""             # the key of the base it starts from


@dataclass
class Base:
    key: str
    checkpoint: str            # where it is, or where pretraining writes it
    job: str = "pretrain"      # the name of the worker group that pretrains it
    pretrain_from: str | None = None  # set while it is still to be pretrained (from that checkpoint)
    row: Row | None = None
    state: str = "waiting"     # while pretraining: waiting -> running -> ended

    @property
    def ready(self) -> bool:
        return self.pretrain_from is None


class Scheduler:
    def __init__(self, branches: list[Branch], stages: int, slots: int, bases: list[Base]):
        """`branches` and `bases` may hold what an earlier attempt finished (trained stages,
        rows, a pretrained base)."""
        self.branches = {b.name: b for b in branches}
        self.bases = {b.key: b for b in bases}
        self.stages, self.slots = stages, max(1, slots)

    def start(self) -> list[Launch | Pretrain | Evaluate]:
        actions: list = [Evaluate(None, 0, b.checkpoint, b.key)
                         for b in self.bases.values() if b.ready and b.row is None]
        for branch in self.branches.values():
            actions += [Evaluate(branch.name, i, c) for i, c in sorted(branch.trained.items()) if i not in branch.rows]
            if len(branch.trained) == self.stages:
                branch.state = "ended"
        return actions + self._launch()

    def on(self, event) -> list[Launch | Pretrain | Evaluate]:
        if isinstance(event, BaseEvaluated):
            self.bases[event.base].row = event.row
        elif isinstance(event, StageTrained) and event.stage == 0:
            base = self._base_of(event.branch)
            if base.ready:
                return []  # heard again after a restart
            base.pretrain_from, base.checkpoint = None, event.checkpoint
            return [Evaluate(None, 0, base.checkpoint, base.key)]
        elif isinstance(event, StageTrained):
            branch = self.branches[event.branch]
            if event.stage not in branch.trained:  # else: heard again after a restart
                branch.trained[event.stage] = event.checkpoint
                return [Evaluate(branch.name, event.stage, event.checkpoint)]
        elif isinstance(event, StageEvaluated):
            self.branches[event.branch].rows[event.stage] = event.row
        elif isinstance(event, BranchEnded) and event.branch not in self.branches:
            base = self._base_of(event.branch)
            if not base.ready:
                raise RuntimeError(f"{event.branch} ended before its base was pretrained")
            base.state = "ended"
            return self._launch()
        elif isinstance(event, BranchEnded):
            branch = self.branches[event.branch]
            if len(branch.trained) < self.stages:
                raise RuntimeError(f"branch {branch.name} ended after {len(branch.trained)} of {self.stages} stages")
            branch.state = "ended"
            return self._launch()
        return []

    def _base_of(self, job: str) -> Base:
        return next(base for base in self.bases.values() if base.job == job)

    def _launch(self) -> list[Launch | Pretrain]:
        """Bases to pretrain first (branches wait on them), then branches whose base is ready."""
        running = sum(n.state == "running" for n in [*self.bases.values(), *self.branches.values()])
        actions: list = []
        for base in self.bases.values():
            if not base.ready and base.state == "waiting" and running < self.slots:
                base.state, running = "running", running + 1
                actions.append(Pretrain(base.key, base.pretrain_from))
        for branch in self.branches.values():
            startable = branch.trained or self.bases[branch.base].ready
            if branch.state == "waiting" and startable and running < self.slots:
                branch.state, running = "running", running + 1
                first = len(branch.trained) + 1
                actions.append(Launch(branch.name, first, branch.trained[first - 1] if first > 1 else
                                      self.bases[branch.base].checkpoint))
        return actions

    def waiting(self) -> list[str]:
        return [b.name for b in self.branches.values() if b.state == "waiting"]

    @property
    def done(self) -> bool:
        return all(b.row is not None for b in self.bases.values()) and all(
            b.state == "ended" and len(b.rows) == self.stages for b in self.branches.values())
