"""One Tune trial: exactly one branch, the pipeline's stages under the sampled method, run by
the same planner, scheduler and runner as `hft-ray run` (hft_ray/run/pipeline.py). After each
stage's row it reports to Tune: the summary so far, the objective, and (as its checkpoint) what
a restored trial needs to go on from there."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from hft_ray.config.space import Objective, objective_value
from hft_ray.config.spec import parse_spec
from hft_ray.config.trial_pipeline import trial_pipeline
from hft_ray.core.metrics import summary
from hft_ray.data.loading import DomainData
from hft_ray.run.planner import Planner
from hft_ray.run.ray_worker import Scaling
from hft_ray.run.results import build_matrix
from hft_ray.run.retention import releasable
from hft_ray.run.runner import RayRunner, Services
from hft_ray.run.scheduler import Branch, BranchFailed, Evaluate, Launch, Scheduler, StageEvaluated
from hft_ray.storage import Location
from hft_ray.train.events import StageStarted, StageTrained

STATE_FILE = "trial.json"
BRANCH = "best"  # the trial's method, named as in the pipeline file made from it


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares, put once into the object store by tune.with_parameters."""

    pipeline_data: dict        # the searched pipeline, after `set:`
    domains: dict[str, DomainData]
    base_checkpoint: str
    base_row: dict
    services: Services
    folder: str                # the search's folder: a trial's checkpoints go under folder/<trial id>
    objective: Objective
    metrics: dict[str, str]    # the score each column's matrix reads, by domain


class TrialReport:
    """The metrics of each stage as its row arrives, reported to Tune in stage order."""

    def __init__(self, spec, base_row: dict, objective: Objective, state: dict, metrics: dict[str, str]):
        self.spec, self.base_row, self.objective, self.state = spec, base_row, objective, state
        self.metrics = metrics
        self.trained: dict[int, dict] = {}  # stage -> what its training gave (this attempt)

    def stage_started(self, event: StageStarted) -> None:
        fractions = event.selection.get("fractions", {})
        self.trained.setdefault(event.stage, {}).update(
            trained_fraction_by_params=fractions.get("by_params", {}).get("overall", 1.0),
            trained_fraction_by_matrices=fractions.get("by_matrices", {}).get("overall", 1.0))

    def stage_trained(self, event: StageTrained) -> None:
        self.state["trained"][str(event.stage)] = event.checkpoint
        self.trained.setdefault(event.stage, {}).update(
            {"train/loss": event.losses[-1], "time/train_s": event.train_s, "time/step_s": event.step_s})
        self._release()

    def _release(self) -> None:
        """`output.keep` (a trial's default: its last stage only; the best trial's pipeline file
        trains again from the base, so no other trial checkpoint is needed)."""
        removed = self.state.setdefault("removed", [])
        trained, evaluated = {int(i) for i in self.state["trained"]}, {int(i) for i in self.state["rows"]}
        for index in releasable(trained, evaluated, len(self.spec.stages), self.spec.output.keep or "last"):
            if index not in removed:
                Location(self.state["trained"][str(index)]).remove()
                removed.append(index)

    def evaluated(self, event: StageEvaluated) -> None:
        self.state["rows"][str(event.stage)] = event.row
        self._release()
        while str(self.state["reported"] + 1) in self.state["rows"]:
            self.state["reported"] += 1
            self._report(self.state["reported"])

    def _report(self, stage: int) -> None:
        rows = [self.base_row] + [self.state["rows"][str(i)] for i in range(1, stage + 1)]
        matrix = build_matrix(self.spec, rows, self.metrics)
        values = summary(matrix)
        metrics = {"stage": stage, "objective": objective_value(self.objective, values), **values,
                   **{f"eval/{d}": s[self.metrics[d]] for d, s in rows[-1].items()},
                   **self.trained.get(stage, {}), "matrix": json.dumps(matrix.to_dict())}
        # ASHA may stop the trial at this report (its actor is killed): everything the driver
        # logs for this stage travels in it.
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / STATE_FILE).write_text(json.dumps(self.state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def run_trial(config: dict, context: TrialContext) -> None:
    spec = parse_spec(trial_pipeline(context.pipeline_data, config), "trial pipeline")
    trial_id = tune.get_context().get_trial_id()
    planner = Planner(spec, context.domains, Location(context.folder) / trial_id)
    state = {"trained": {}, "rows": {}, "reported": 0}
    restored = tune.get_checkpoint()  # set when `hft-ray tune --resume` picks the trial up again
    if restored is not None:
        with restored.as_directory() as folder:
            state = json.loads((Path(folder) / STATE_FILE).read_text())
    branch = Branch(BRANCH, trained={int(i): c for i, c in state["trained"].items()},
                    rows={int(i): r for i, r in state["rows"].items()})
    scheduler = Scheduler([branch], len(spec.stages), 1, context.base_checkpoint, context.base_row)
    t = spec.train
    runner = RayRunner(context.services, trial_id, str(Location(context.folder) / "ray"),
                       Scaling.of(t))
    report = TrialReport(spec, context.base_row, context.objective, state, context.metrics)
    handlers = {StageStarted: report.stage_started, StageTrained: report.stage_trained,
                StageEvaluated: report.evaluated}

    def act(actions) -> None:
        for action in actions:
            if isinstance(action, Launch):  # a new Ray Train run name per attempt of the trial
                runner.launch(planner.branch(BRANCH, action.first, action.start), f"{trial_id}-{time.time_ns()}")
            elif isinstance(action, Evaluate):
                runner.evaluate(action)

    act(scheduler.start())
    for event in runner.events():
        if isinstance(event, BranchFailed):
            raise RuntimeError(f"trial {trial_id} failed: {event.reason}")
        if type(event) in handlers:
            handlers[type(event)](event)
        act(scheduler.on(event))
