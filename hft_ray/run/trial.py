"""One Tune trial: the pipeline's stages under the sampled method, one branch per seed (one,
without `seeds`), run by the same layout, planner, scheduler and runner as `hft-ray run`
(hft_ray/run/pipeline.py), from the bases the search made before its trials. Once every seed's
row of a stage is in, it reports to Tune: the summary so far (over seeds: the mean, and each
metric's `.std`), the objective (the mean of the seeds' objectives: ASHA stops trials on it), and
(as its checkpoint) what a restored trial needs to go on from there."""

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
from hft_ray.core.seeds import matrices_over_seeds, summaries_over_seeds
from hft_ray.data.loading import DomainData
from hft_ray.run.layout import Layout
from hft_ray.run.ray_worker import Scaling
from hft_ray.run.results import build_matrix
from hft_ray.run.retention import releasable
from hft_ray.run.runner import RayRunner, Services
from hft_ray.run.scheduler import Base, Branch, BranchFailed, Evaluate, Launch, Scheduler, StageEvaluated
from hft_ray.storage import Location
from hft_ray.train.events import StageStarted, StageTrained

STATE_FILE = "trial.json"
METHOD = "best"  # the trial's method, named as in the pipeline file made from it


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares, put once into the object store by tune.with_parameters."""

    pipeline_data: dict        # the searched pipeline, after `set:`
    domains: dict[str, DomainData]
    bases: dict[str, tuple[str, dict]]  # key (hft_ray/run/layout.py) -> (checkpoint, row 0)
    services: Services
    folder: str                # the search's folder: a trial's checkpoints go under folder/<trial id>
    objective: Objective
    metrics: dict[str, str]    # the score each column's matrix reads, by domain


class TrialReport:
    """The metrics of each stage as its rows arrive, reported to Tune in stage order. `state`
    (what a restored trial reads): {"trained": {branch: {stage: checkpoint}}, "rows": {branch:
    {stage: row}}, "removed": {branch: [stage, ...]}, "reported": stages reported}."""

    def __init__(self, spec, layout: Layout, bases: dict[str, tuple[str, dict]], objective: Objective, state: dict,
                 metrics: dict[str, str]):
        self.spec, self.layout, self.bases, self.objective, self.state = spec, layout, bases, objective, state
        self.metrics = metrics
        self.trained: dict[int, dict[str, list]] = {}  # stage -> what its training gave, per seed (this attempt)

    def _add(self, stage: int, values: dict) -> None:
        for key, value in values.items():
            self.trained.setdefault(stage, {}).setdefault(key, []).append(value)

    def stage_started(self, event: StageStarted) -> None:
        fractions = event.selection.get("fractions", {})
        self._add(event.stage, {"trained_fraction_by_params": fractions.get("by_params", {}).get("overall", 1.0),
                                "trained_fraction_by_matrices": fractions.get("by_matrices", {}).get("overall", 1.0)})

    def stage_trained(self, event: StageTrained) -> None:
        self.state["trained"].setdefault(event.branch, {})[str(event.stage)] = event.checkpoint
        self._add(event.stage, {"train/loss": event.losses[-1], "time/train_s": event.train_s,
                                "time/step_s": event.step_s})
        self._release(event.branch)

    def _release(self, branch: str) -> None:
        """`output.keep` (a trial's default: its last stage only; the best trial's pipeline file
        trains again from the base, so no other trial checkpoint is needed)."""
        removed = self.state.setdefault("removed", {}).setdefault(branch, [])
        trained = {int(i) for i in self.state["trained"].get(branch, {})}
        evaluated = {int(i) for i in self.state["rows"].get(branch, {})}
        for index in releasable(trained, evaluated, len(self.spec.stages), self.spec.output.keep or "last"):
            if index not in removed:
                Location(self.state["trained"][branch][str(index)]).remove()
                removed.append(index)

    def evaluated(self, event: StageEvaluated) -> None:
        self.state["rows"].setdefault(event.branch, {})[str(event.stage)] = event.row
        self._release(event.branch)
        while all(str(self.state["reported"] + 1) in self.state["rows"].get(b, {}) for b in self.layout.branches):
            self.state["reported"] += 1
            self._report(self.state["reported"])

    def _report(self, stage: int) -> None:
        matrices, summaries, objectives = [], [], []
        for name, node in self.layout.branches.items():
            rows = [self.bases[node.base][1]] + [self.state["rows"][name][str(i)] for i in range(1, stage + 1)]
            matrices.append(build_matrix(self.spec, rows, self.metrics))
            summaries.append(summary(matrices[-1]))
            objectives.append(objective_value(self.objective, summaries[-1]))
        values, stds = summaries_over_seeds(summaries)
        matrix = matrices_over_seeds(matrices)[0]
        last = matrix.scores[-1]
        metrics = {"stage": stage, "objective": sum(objectives) / len(objectives), **values,
                   **{f"eval/{d}": last[k] for k, d in enumerate(matrix.columns)},
                   **{k: sum(v) / len(v) for k, v in self.trained.get(stage, {}).items()},
                   "matrix": json.dumps(matrix.to_dict())}
        if self.layout.several:
            objective_std = summaries_over_seeds([{"objective": o} for o in objectives])[1]["objective"]
            metrics.update({"objective.std": objective_std, **{f"{k}.std": v for k, v in stds.items()},
                            "seeds": len(objectives)})
        # ASHA may stop the trial at this report (its actor is killed): everything the driver
        # logs for this stage travels in it.
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / STATE_FILE).write_text(json.dumps(self.state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def run_trial(config: dict, context: TrialContext) -> None:
    spec = parse_spec(trial_pipeline(context.pipeline_data, config), "trial pipeline")
    trial_id = tune.get_context().get_trial_id()
    layout = Layout(spec, context.domains, Location(context.folder) / trial_id)
    state = {"trained": {}, "rows": {}, "reported": 0}
    restored = tune.get_checkpoint()  # set when `hft-ray tune --resume` picks the trial up again
    if restored is not None:
        with restored.as_directory() as folder:
            state = json.loads((Path(folder) / STATE_FILE).read_text())
    branches = [Branch(name, trained={int(i): c for i, c in state["trained"].get(name, {}).items()},
                       rows={int(i): r for i, r in state["rows"].get(name, {}).items()}, base=node.base)
                for name, node in layout.branches.items()]
    bases = [Base(key, checkpoint, row=row) for key, (checkpoint, row) in context.bases.items()]
    scheduler = Scheduler(branches, len(spec.stages), len(branches), bases)
    runner = RayRunner(context.services, trial_id, str(Location(context.folder) / "ray"), Scaling.of(spec.train))
    report = TrialReport(spec, layout, context.bases, context.objective, state, context.metrics)
    handlers = {StageStarted: report.stage_started, StageTrained: report.stage_trained,
                StageEvaluated: report.evaluated}

    def act(actions) -> None:
        for action in actions:
            if isinstance(action, Launch):  # a new Ray Train run name per attempt of the trial
                seed = layout.branches[action.branch].seed
                runner.launch(layout.job(action.branch, action.first, action.start),
                              f"{trial_id}-{seed}-{time.time_ns()}")
            elif isinstance(action, Evaluate):
                runner.evaluate(action)

    act(scheduler.start())
    for event in runner.events():
        if isinstance(event, BranchFailed):
            raise RuntimeError(f"trial {trial_id} failed: {event.reason}")
        if type(event) in handlers:
            handlers[type(event)](event)
        act(scheduler.on(event))
