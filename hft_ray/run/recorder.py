"""A pipeline run's events, recorded: a child run per (method, stage) in MLflow, the manifest
that `--resume` reads, and the lines the user sees. Nothing is recorded twice: an event heard
again after a worker restart or a resumed driver finds its stage already done and is dropped."""

from __future__ import annotations

from hft_ray.config.spec import PipelineSpec
from hft_ray.run.layout import BranchNode, Layout
from hft_ray.run.manifest import Manifest
from hft_ray.run.progress import Board
from hft_ray.run.retention import releasable
from hft_ray.run.runner import RunFailure
from hft_ray.run.scheduler import BaseEvaluated, Branch, BranchEnded, BranchFailed, StageEvaluated
from hft_ray.run.tracking import SystemMetrics, Tracker
from hft_ray.storage import Location
from hft_ray.train.checkpoints import read_json
from hft_ray.train.events import StageResumed, StageStarted, StageTrained, StepsDone
from hft_ray.train.stage import PLAN_FILE


class Recorder:
    def __init__(self, spec: PipelineSpec, layout: Layout, manifest: Manifest, tracker: Tracker, board: Board,
                 logs: str, metrics: dict[str, str]):
        self.spec, self.layout, self.manifest, self.tracker, self.board = spec, layout, manifest, tracker, board
        self.logs = logs
        self.metrics = metrics  # the score each column's matrix reads, by domain
        self.open_runs: set[str] = set()
        self.system: dict[str, SystemMetrics] = {}
        self.handlers = {StageStarted: self.stage_started, StageResumed: self.stage_resumed,
                         StepsDone: self.steps_done, StageTrained: self.stage_trained,
                         StageEvaluated: self.stage_evaluated, BaseEvaluated: self.base_evaluated,
                         BranchEnded: self.branch_ended, BranchFailed: self.branch_failed}

    def opened(self, run_id: str) -> None:
        """A run to end FAILED should the run fail (the parent run)."""
        self.open_runs.add(run_id)

    def record(self, event) -> None:
        self.handlers[type(event)](event)

    def branch_from_manifest(self, node: BranchNode) -> Branch:
        """What an earlier attempt of this run finished of the branch (nothing, for a new run)."""
        done = self.manifest.finished_stages(node.name)
        stages = {i: self.manifest.stage(node.name, i) for i in range(1, done + 1)}
        branch = Branch(node.name, trained={i: e["checkpoint"] for i, e in stages.items()},
                        rows={i: e["row"] for i, e in stages.items() if e.get("row")}, base=node.base)
        for index in set(branch.trained) - set(branch.rows):  # trained, not evaluated: its run stays open
            self._reopen(stages[index]["run_id"])
        if done:
            self.board.say(f"[hft-ray] {node.name}: stages 1-{done} done in an earlier attempt")
        return branch

    def _label(self, method: str, index: int) -> str:
        if index == 0:
            return method  # the base's worker group: pretrain, or pretrain@<seed>
        return f"{method} stage {index}/{len(self.spec.stages)} ({self.spec.stages[index - 1].domain})"

    def _reopen(self, run_id: str) -> None:
        if run_id not in self.open_runs:
            self.tracker.reopen(run_id, self.manifest.attempt)
            self.open_runs.add(run_id)

    def _stage_run(self, branch: str, index: int, selection: dict) -> str:
        """The stage's child run: this attempt's, an earlier attempt's (reopened), or a new one."""
        entry = self.manifest.stage(branch, index)
        if entry.get("run_id"):
            self._reopen(entry["run_id"])
            return entry["run_id"]
        node, planner = self.layout.branches[branch], self.layout.planner(branch)
        entry["run_id"] = self.tracker.start_stage(self.manifest.parent_run_id, node.method, index,
                                                   self.spec.stages[index - 1].domain,
                                                   node.seed if self.layout.several else None)
        self.tracker.log_selection(entry["run_id"], selection, planner.replay(node.method, index))
        if self.spec.stages[index - 1].kind == "sft":  # the token folders the stage read (hft_ray/data/tokens.py)
            folders = [Location(part.folder).name for part in planner.parts(node.method, index)]
            self.tracker.log_params(entry["run_id"], {"data.tokens": ",".join(folders)})
        if selection.get("importance"):
            entry["importance"] = selection["importance"]
        self.manifest.save()
        self.open_runs.add(entry["run_id"])
        return entry["run_id"]

    def stage_started(self, event: StageStarted) -> None:
        if event.stage == 0:
            self.board.stage_started(event.branch, event.branch, event.steps)
            return
        run_id = self._stage_run(event.branch, event.stage, event.selection)
        if run_id not in self.system:
            self.system[run_id] = self.tracker.watch_system(run_id)
        label = self._label(event.branch, event.stage)
        self.board.stage_started(event.branch, label, event.steps)
        self.board.say(f"[hft-ray] {label}: training {event.steps} steps on {self.spec.train.workers} worker(s), "
                       f"{event.trainable / event.total:.0%} of parameters trained")
        strategy = self.spec.methods[self.layout.method(event.branch)].model_dump().get("strategy")
        if strategy == "importance" and event.selection.get("importance"):
            scores = event.selection["importance"]
            top = sorted(scores, key=scores.get, reverse=True)[:3]
            self.board.say(f"[hft-ray] {label}: most important to earlier domains: {', '.join(top)} (frozen)")
        elif strategy == "importance":
            self.board.say(f"[hft-ray] {label}: nothing learnt earlier to protect (no pretrain block): a random draw")

    def stage_resumed(self, event: StageResumed) -> None:
        self.board.say(f"[hft-ray] {self._label(event.branch, event.stage)}: resuming at step {event.step + 1} "
                       "after a worker failure")

    def steps_done(self, event: StepsDone) -> None:
        self.board.steps_done(event.branch, self._label(event.branch, event.stage), event.step, event.steps,
                              event.loss, event.steps_per_s)

    def stage_trained(self, event: StageTrained) -> None:
        if event.stage == 0:
            return self.pretrained(event)
        entry = self.manifest.stage(event.branch, event.stage)
        if entry.get("checkpoint"):
            return  # heard again after a restart
        run_id = self._stage_run(event.branch, event.stage, read_json(event.checkpoint, PLAN_FILE))
        if run_id in self.system:
            self.system.pop(run_id).stop()
        self.tracker.log_training(run_id, event.losses, event.train_s, event.step_s, event.memory)
        self.tracker.tag_node(run_id, "train", event.node)
        entry["checkpoint"] = event.checkpoint
        self.manifest.save()
        self._release(event.branch)
        self.board.say(f"[hft-ray] {self._label(event.branch, event.stage).split(' (')[0]} done: loss "
                       f"{event.losses[-1]:.4f}, {event.train_s:.0f}s, {event.step_s * 1000:.0f} ms/step")

    def pretrained(self, event: StageTrained) -> None:
        """A base model, pretrained in its own worker group (stage 0)."""
        base = self.layout.base_of_job(event.branch)
        self.manifest.base(base.key)["checkpoint"] = event.checkpoint
        self.manifest.save()
        (base.folder / "init").remove()  # the untrained weights
        self.board.say(f"[hft-ray] {event.branch} done: loss {event.losses[-1]:.4f} in {event.train_s:.0f}s")

    def stage_evaluated(self, event: StageEvaluated) -> None:
        entry = self.manifest.stage(event.branch, event.stage)
        self.tracker.log_metrics(entry["run_id"], {
            **{f"eval/{d}": s[self.metrics[d]] for d, s in event.row.items()},
            **{f"eval_all/{d}/{m}": v for d, s in event.row.items() for m, v in s.items()}})
        self.tracker.tag_node(entry["run_id"], "eval", event.node)
        for name, report in event.reports.items():
            self.tracker.log_json(entry["run_id"], report, f"harness/{name}.json")
        self.tracker.finish(entry["run_id"])
        self.open_runs.discard(entry["run_id"])
        entry["row"] = event.row
        self.manifest.save()
        self.board.say(f"[hft-ray] {event.branch} after stage {event.stage}: {self._row_text(event.row)}")
        self._release(event.branch)

    def _release(self, method: str) -> None:
        """`output.keep`: remove the stage checkpoints it does not keep, each once it is evaluated and
        the next stage (which starts from it, and whose DPO reference it is) has written its own."""
        stages = {i: self.manifest.stage(method, i) for i in range(1, len(self.spec.stages) + 1)}
        trained = {i for i, e in stages.items() if e.get("checkpoint")}
        evaluated = {i for i, e in stages.items() if e.get("row")}
        for index in releasable(trained, evaluated, len(stages), self.spec.output.keep or "all"):
            if not stages[index].get("removed"):
                Location(stages[index]["checkpoint"]).remove()
                stages[index]["removed"] = True
                self.manifest.save()

    def base_evaluated(self, event: BaseEvaluated) -> None:
        folder = "/".join(filter(None, ["harness/base", event.base]))
        for name, report in event.reports.items():  # the parent run is open: events come after it starts
            self.tracker.log_json(self.manifest.parent_run_id, report, f"{folder}/{name}.json")
        self.manifest.base(event.base)["scores"] = event.row
        self.manifest.save()
        self.board.say(f"[hft-ray] base{' ' + event.base if event.base else ''}: {self._row_text(event.row)}")

    def branch_ended(self, event: BranchEnded) -> None:
        pass

    def branch_failed(self, event: BranchFailed) -> None:
        raise RunFailure(f"{event.branch} failed: {event.reason}; logs under {self.logs}")

    def _row_text(self, row: dict) -> str:
        return "  ".join(f"{d}={s[self.metrics[d]]:.2f}" for d, s in row.items())

    def fail(self, reason: str) -> None:
        """End every open run FAILED with `reason` (never leave one RUNNING)."""
        for watcher in self.system.values():
            watcher.stop()
        self.system.clear()
        for run_id in self.open_runs:
            self.tracker.fail(run_id, reason)
