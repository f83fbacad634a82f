"""What a branch's rank-0 worker tells whoever drives it, through `Channel.notify`.
Plain data: the driver turns these into MLflow runs, progress lines and evaluations."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageStarted:
    branch: str
    stage: int
    steps: int
    selection: dict            # what the stage trains (selection.json): the plan, "all", or adapters
    trainable: int             # parameters (entries, under masks) the optimizer updates
    total: int


@dataclass(frozen=True)
class StageResumed:
    """A restarted worker group picked the stage up at `step` + 1 from a resumable checkpoint."""

    branch: str
    stage: int
    step: int


@dataclass(frozen=True)
class StepsDone:
    """Progress, every `log_every` optimizer steps."""

    branch: str
    stage: int
    step: int
    steps: int
    loss: float
    steps_per_s: float


@dataclass(frozen=True)
class StageTrained:
    """The stage's checkpoint is written whole at `checkpoint`."""

    branch: str
    stage: int
    checkpoint: str
    losses: list[float]        # one per optimizer step, 1..steps, across worker restarts
    train_s: float             # the sum of step times
    step_s: float              # the median step
    trainable: int
    total: int
    node: str = ""             # where rank 0 ran: the Ray node id, under Ray
    memory: dict = field(default_factory=dict)  # peaks while it trained: memory/host_peak_gb/rank<r>, gpu


WORKER_EVENTS = (StageStarted, StageResumed, StepsDone, StageTrained)
