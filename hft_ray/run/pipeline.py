"""`hft-ray run`: the pipeline's DAG (docs/design.md, "Data flow") driven from here.

    base model (+ pretrain, in a worker group of its own; one base per seed where the seed
      changes it, hft_ray/run/layout.py) -> row 0
      -> a worker group per branch (method, and seed), side by side: its stages in order
      -> each stage's checkpoint evaluated on every domain while the next stage trains
      -> forgetting matrix per branch -> MLflow (with several seeds: means, deviations and
         paired comparisons, hft_ray/run/results.py)

The scheduler decides (hft_ray/run/scheduler.py), the runner does it on Ray
(hft_ray/run/runner.py), and this driver records: it is the only process writing to MLflow.
"""

from __future__ import annotations

import os
import time

from hft_ray.config.preflight import Prepared
from hft_ray.run.base import bases, launch_pretrain, pretrain_threads
from hft_ray.run.cluster import Capacity, branch_slots
from hft_ray.run.layout import Layout
from hft_ray.run.manifest import Manifest, spec_digest
from hft_ray.run.progress import Board
from hft_ray.run.ray_worker import Scaling
from hft_ray.run.recorder import Recorder
from hft_ray.run.results import PipelineResult, record_results
from hft_ray.run.runner import EvalSettings, RayRunner, Services
from hft_ray.run.scheduler import Evaluate, Launch, Pretrain, Scheduler
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
        self.layout = Layout(self.spec, self.domains, self.output_dir)

    def run_name(self, what: str) -> str:
        """A new Ray Train run name per attempt (reusing one resumes that old run)."""
        return f"{what}-{self.output_dir.name}" + (f"-a{self.manifest.attempt}" if self.manifest.attempt else "")

    def run(self) -> PipelineResult:
        spec, manifest, t = self.spec, self.manifest, self.spec.train
        fit = branch_slots(t.workers, t.cpus_per_worker, t.use_gpu, self.capacity)
        self.slots = min(len(self.layout.branches), fit)
        # Evaluators warm up (import torch) while this driver sets up; one per two branches at once
        # keeps up with them (an evaluation takes a fraction of a stage).
        services = Services.start({n: list(d.eval[: spec.eval.max_examples]) for n, d in self.domains.items()},
                                  EvalSettings.of(self.prepared), max(1, self.slots // 2))
        runner = RayRunner(services, self.output_dir.name, str(self.output_dir / "ray"),
                           Scaling.of(t))
        recorder = Recorder(spec, self.layout, manifest, self.tracker, self.board, str(self.output_dir / "ray"),
                            self.prepared.metrics)
        try:
            scheduler = self._start(runner, recorder)
            self._open_parent_run(recorder)  # while the worker groups start
            for event in runner.events():
                recorder.record(event)
                self._act(runner, scheduler.on(event), scheduler)
            rows = {"bases": {k: b.row for k, b in scheduler.bases.items()},
                    **{b.name: b.rows for b in scheduler.branches.values()}}
            result = record_results(spec, self.layout, self.tracker, manifest.parent_run_id, rows,
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
        """The bases, then the first launches (and evaluations)."""
        nodes = bases(self.spec, self.layout, self.manifest)
        self.side_by_side = min(self.slots, sum(not b.ready for b in nodes)) or 1  # bases pretraining at first
        branches = [recorder.branch_from_manifest(node) for node in self.layout.branches.values()]
        scheduler = Scheduler(branches, len(self.spec.stages), self.slots, nodes)
        self._act(runner, scheduler.start(), scheduler)
        return scheduler

    def _act(self, runner: RayRunner, actions: list, scheduler: Scheduler) -> None:
        for action in actions:
            if isinstance(action, Launch):
                runner.launch(self.layout.job(action.branch, action.first, action.start), self.run_name(action.branch))
            elif isinstance(action, Pretrain):
                threads = pretrain_threads(self.spec, self.capacity, self.side_by_side)
                name = self.layout.bases[action.base].job_name
                launch_pretrain(self.spec, self.layout, action, runner, threads, self.run_name(name), self.board)
            elif isinstance(action, Evaluate):
                runner.evaluate(action)
        waiting = scheduler.waiting()
        if waiting and any(isinstance(a, (Launch, Pretrain)) for a in actions):
            self.board.say(f"[hft-ray] {', '.join(waiting)}: waiting for a base or a free slot "
                           f"({scheduler.slots} worker group(s) train at once here)")
