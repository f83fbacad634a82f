"""`hft-ray run`: the pipeline's DAG (docs/design.md, "Data flow") driven from here.

    base model (+ pretrain) -> row 0
      -> a worker group per method branch, side by side: its stages in order
      -> each stage's checkpoint evaluated on every domain while the next stage trains
      -> forgetting matrix per branch -> MLflow

The scheduler decides (hft_ray/run/scheduler.py), the runner does it on Ray
(hft_ray/run/runner.py), and this driver records: it is the only process writing to MLflow.
"""

from __future__ import annotations

import os
import time

from hft_ray.config.preflight import Prepared
from hft_ray.run.base import initial_checkpoint, pretrain_threads
from hft_ray.run.cluster import Capacity, branch_slots
from hft_ray.run.manifest import Manifest, spec_digest
from hft_ray.run.planner import Planner
from hft_ray.run.progress import Board
from hft_ray.run.ray_worker import Scaling
from hft_ray.run.recorder import Recorder
from hft_ray.run.results import PipelineResult, record_results
from hft_ray.run.runner import EvalSettings, RayRunner, Services
from hft_ray.run.scheduler import Evaluate, Launch, Scheduler
from hft_ray.run.tracking import Tracker
from hft_ray.storage import Location


class PipelineRun:
    def __init__(self, prepared: Prepared, pipeline_text: str, tracker: Tracker, board: Board,
                 capacity: Capacity, resume: Manifest | None = None):
        """A new run, or with `resume` the continuation of a run whose driver died."""
        self.prepared, self.spec, self.domains = prepared, prepared.spec, prepared.domains
        self.pipeline_text = pipeline_text
        self.tracker, self.board, self.capacity = tracker, board, capacity
        if resume is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            folder = Location(self.spec.output.dir) / f"{self.spec.name}-{stamp}-{os.getpid()}"
            resume = Manifest(folder, spec_digest(self.spec.model_dump(mode="json")))
        else:
            resume.attempt += 1
            resume.take_over()
        self.manifest = resume
        self.output_dir = resume.folder
        self.planner = Planner(self.spec, self.domains, self.output_dir)

    def run_name(self, what: str) -> str:
        """A new Ray Train run name per attempt (reusing one resumes that old run)."""
        return f"{what}-{self.output_dir.name}" + (f"-a{self.manifest.attempt}" if self.manifest.attempt else "")

    def run(self) -> PipelineResult:
        spec, manifest, t = self.spec, self.manifest, self.spec.train
        self.slots = min(len(spec.methods), branch_slots(t.workers, t.cpus_per_worker, t.use_gpu, self.capacity))
        # Evaluators warm up (import torch) while this driver sets up; one per two branches at once
        # keeps up with them (an evaluation takes a fraction of a stage).
        services = Services.start({n: list(d.eval[: spec.eval.max_examples]) for n, d in self.domains.items()},
                                  EvalSettings.of(self.prepared), max(1, self.slots // 2))
        runner = RayRunner(services, self.output_dir.name, str(self.output_dir / "ray"),
                           Scaling.of(t))
        recorder = Recorder(spec, self.planner, manifest, self.tracker, self.board, str(self.output_dir / "ray"),
                            self.prepared.metrics)
        try:
            scheduler = self._start(runner, recorder)
            self._open_parent_run(recorder)  # while the worker groups start
            for event in runner.events():
                recorder.record(event)
                self._act(runner, scheduler.on(event), scheduler)
            rows = {"base": scheduler.base_row, **{b.name: b.rows for b in scheduler.branches.values()}}
            result = record_results(spec, self.tracker, manifest.parent_run_id, self.output_dir, rows,
                                    self.prepared.metrics)
        except BaseException as error:
            recorder.fail(str(error) or type(error).__name__)
            raise
        finally:
            services.close()
        self.tracker.finish(manifest.parent_run_id)
        return result

    def _open_parent_run(self, recorder: Recorder) -> None:
        spec, manifest = self.spec, self.manifest
        if manifest.parent_run_id:
            self.tracker.reopen(manifest.parent_run_id, manifest.attempt)
        else:
            # params: the flattened spec, and `metric.<domain>`, the score each column's matrix reads
            manifest.parent_run_id = self.tracker.start_pipeline(
                spec.name, {**spec.model_dump(mode="json"), "metric": self.prepared.metrics}, self.pipeline_text,
                spec.model_dump(mode="json"), str(self.output_dir))
        recorder.opened(manifest.parent_run_id)
        manifest.save()
        self.board.say(f"[hft-ray] MLflow parent run {manifest.parent_run_id} in experiment {spec.experiment!r} "
                       f"({self.tracker.tracking_uri})")

    def _start(self, runner: RayRunner, recorder: Recorder) -> Scheduler:
        """The base model's first checkpoint, then the first launches (and evaluations)."""
        spec, manifest = self.spec, self.manifest
        base, pretrain_from = manifest.base.get("checkpoint"), None
        if not base:
            base = initial_checkpoint(spec, self.output_dir)
            if spec.pretrain:  # the first branch launched pretrains it, the others wait for it
                pretrain_from, base = base, str(self.planner.base)
                self.board.say(f"[hft-ray] pretrain on {', '.join(spec.pretrain.domains)}: {spec.pretrain.steps} steps")
            else:
                manifest.base["checkpoint"] = base
        branches = [recorder.branch_from_manifest(method) for method in spec.methods]
        scheduler = Scheduler(branches, len(spec.stages), self.slots, base, manifest.base.get("scores"), pretrain_from)
        self._act(runner, scheduler.start(), scheduler)
        return scheduler

    def _act(self, runner: RayRunner, actions: list, scheduler: Scheduler) -> None:
        for action in actions:
            if isinstance(action, Launch):
                job = self.planner.branch(action.branch, action.first, action.start, action.wait_for_start,
                                          pretrain_threads(self.spec, self.capacity))
                runner.launch(job, self.run_name(action.branch))
            elif isinstance(action, Evaluate):
                runner.evaluate(action)
        waiting = scheduler.waiting()
        if waiting and any(isinstance(a, Launch) for a in actions):
            self.board.say(f"[hft-ray] {', '.join(waiting)}: waiting for a free slot "
                           f"({scheduler.slots} branch(es) train at once here)")

