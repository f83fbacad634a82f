"""The pipeline DAG (shared/DESIGN.md, "Data flow"):

    base model (+ optional pretrain stage) -> base eval (row 0)
      -> per method branch, in parallel: stage 1 -> stage 2 -> ... (one TorchTrainer each)
      -> after each stage: an eval task over every domain, running beside the next stage
      -> forgetting matrix per branch -> MLflow

The driver is the scheduler: it submits stage and eval tasks as their inputs become ready,
waits on whichever finishes first, and is the only process writing to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from hft_ray.checkpoints import write_checkpoint
from hft_ray.data import Example, mix_balanced, mix_replay
from hft_ray.metrics import ForgettingMatrix, summary
from hft_ray.errors import UserError
from hft_ray.manifest import FILE as MANIFEST_FILE
from hft_ray.manifest import Manifest, spec_digest
from hft_ray.models import load_model, load_tokenizer, meta_model
from hft_ray.preflight import Prepared
from hft_ray.selection import model_units, plan_units
from hft_ray.spec import HFTMethod, LoRAMethod, PipelineSpec
from hft_ray.stage import StageJob, StageResult, run_stage
from hft_ray.tracking import Tracker


class PipelineFailure(RuntimeError):
    """A stage or evaluation failed at run time (exit code 1)."""


@dataclass
class PipelineResult:
    parent_run_id: str
    output_dir: str
    matrices: dict[str, ForgettingMatrix]
    summaries: dict[str, dict[str, float]]

    def to_json(self) -> dict:
        return {"parent_run_id": self.parent_run_id, "output_dir": self.output_dir,
                "methods": {m: {"matrix": self.matrices[m].to_dict(), "summary": self.summaries[m]}
                            for m in self.matrices}}


@dataclass
class Branch:
    """One method's chain of stages."""

    method: str
    checkpoint: str
    done: int = 0                                         # stages finished
    rows: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    run_ids: dict[int, str] = field(default_factory=dict)  # stage -> MLflow child run


@ray.remote(num_cpus=0)  # it only waits on the TorchTrainer, whose workers hold the CPUs
def _stage_task(job: StageJob, storage: str, run_name: str, workers: int, cpus: float, gpu: bool,
                max_failures: int) -> StageResult:
    return run_stage(job, storage, run_name, workers, cpus, gpu, max_failures)


@ray.remote
def _importance_task(checkpoint: str, units: list, earlier: list, settings: dict) -> dict[str, float]:
    from hft_ray.importance import measure

    return measure(checkpoint, units, earlier, **settings)


@ray.remote(num_cpus=1)
def _eval_task(checkpoint: str, eval_sets: dict[str, list[Example]], settings: dict) -> dict[str, dict[str, float]]:
    import torch

    from hft_ray.checkpoints import load_checkpoint
    from hft_ray.evaluation import evaluate_domain

    torch.manual_seed(0)
    model, tokenizer = load_checkpoint(checkpoint)
    return {name: evaluate_domain(model, tokenizer, examples, max_new_tokens=settings["max_new_tokens"],
                           batch_size=settings["batch_size"])
            for name, examples in eval_sets.items()}


def init_ray(address: str | None) -> None:
    """Join `address` (or $RAY_ADDRESS, set inside a Ray Job), or start an embedded Ray sized
    for this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local" starts a new instance even when a cluster runs on this machine. The
        # dashboard (on 127.0.0.1) stays: Ray Train's placement-group cleaner asks its state API
        # and warns every few seconds without it.
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=256 * 1024**2,
                 dashboard_host="127.0.0.1", log_to_driver=True)


class PipelineRun:
    def __init__(self, prepared: Prepared, pipeline_text: str, tracker: Tracker,
                 echo: Callable[[str], None] = print, resume: Manifest | None = None):
        """A new run, or with `resume` the continuation of a run whose driver died."""
        self.spec: PipelineSpec = prepared.spec
        self.domains = prepared.domains
        self.pipeline_text = pipeline_text
        self.tracker = tracker
        self.echo = echo
        if resume is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            folder = Path(self.spec.output.dir).resolve() / f"{self.spec.name}-{stamp}-{os.getpid()}"
            resume = Manifest(folder, spec_digest(self.spec.model_dump(mode="json")))
        else:
            resume.attempt += 1
            resume.take_over()
        self.manifest = resume
        self.output_dir = resume.folder
        self.storage = str(self.output_dir / "ray")
        self.eval_sets = {name: list(d.eval[: self.spec.eval.max_examples]) for name, d in self.domains.items()}
        self.parent_id: str | None = None
        self.plans: dict[tuple[str, int], dict] = {}

    # -- building blocks -------------------------------------------------------------------------

    def _job(self, label: str, checkpoint: str, examples, steps: int, lr: float, seed: int, plan,
             kind: str = "sft", beta: float = 0.1, lora: dict | None = None, reselect_every: int = 0) -> StageJob:
        t = self.spec.train
        return StageJob(label=label, init_checkpoint=checkpoint, examples=tuple(examples), steps=steps, lr=lr,
                        batch_size=t.batch_size, max_length=t.max_length, weight_decay=t.weight_decay,
                        seed=seed, log_every=t.log_every, plan=plan, checkpoint_every=t.checkpoint_every,
                        kind=kind, beta=beta, lora=lora, reselect_every=reselect_every)

    def _submit_stage(self, job: StageJob, run_name: str, cpus_per_worker: float | None = None):
        t = self.spec.train
        cpus = cpus_per_worker or t.cpus_per_worker
        return _stage_task.remote(job, self.storage, run_name, t.workers, cpus, t.use_gpu, t.max_failures)

    def _stage_slots(self) -> int:
        """How many stages can train at once. Ray Train gives up on a worker group that waits over
        a minute for resources, so stages beyond what the cluster holds wait in the driver."""
        t = self.spec.train
        resource, need = ("GPU", t.workers) if t.use_gpu else ("CPU", t.workers * t.cpus_per_worker)
        return max(1, int(ray.cluster_resources().get(resource, 0) // need))

    def _submit_eval(self, checkpoint: str):
        return _eval_task.remote(checkpoint, self.eval_sets, self.spec.eval.model_dump())

    def _replay(self, method: str, index: int) -> float:
        """The replayed share of stage `index`'s data: the method's `replay` on an SFT stage
        that has earlier SFT stages to replay, else 0."""
        stages = self.spec.stages
        earlier = any(s.kind == "sft" for s in stages[:index - 1])
        return self.spec.methods[method].replay if stages[index - 1].kind == "sft" and earlier else 0.0

    def _stage_examples(self, method: str, index: int):
        """The stage's training data; with `replay`, mixed with earlier SFT stages' data."""
        stage = self.spec.stages[index - 1]
        current = self.domains[stage.domain].train
        fraction = self._replay(method, index)
        if not fraction:
            return current
        earlier = [self.domains[s.domain].train for s in self.spec.stages[:index - 1] if s.kind == "sft"]
        return mix_replay(current, earlier, fraction, self.spec.seed * 1000 + index)

    def _trained(self, method: str, index: int) -> dict:
        """What a stage trained, for its selection.json: the plan, or all weights, or adapters."""
        lora = self._lora(method)
        if lora:
            return {"kind": "lora", "trained": "adapters on every linear layer, merged", **lora}
        return self._plan(method, index) or {"kind": "fft", "trained": "all"}

    def _lora(self, method: str) -> dict | None:
        config = self.spec.methods[method]
        return config.model_dump(include={"r", "alpha", "dropout"}) if isinstance(config, LoRAMethod) else None

    def _plan(self, method: str, stage: int) -> dict | None:
        """The stage's selection plan as a dict (None for full fine-tuning); a new draw per stage.
        The importance strategy needs the stage's scores first (`_needs_importance`)."""
        config = self.spec.methods[method]
        if not isinstance(config, HFTMethod):
            return None
        if (method, stage) not in self.plans:
            scores = self.manifest.stage(method, stage).get("importance")
            self.plans[(method, stage)] = plan_units(
                self.units, self.model_type, config.granularity, config.ratio, self.spec.seed, stage,
                config.select_embeddings, scores=scores).to_dict()
        return self.plans[(method, stage)]

    def _needs_importance(self, method: str, stage: int) -> bool:
        """An importance-aware stage with earlier domains to protect whose scores are not measured yet."""
        config = self.spec.methods[method]
        return (getattr(config, "strategy", "random") == "importance" and bool(self.spec.earlier_domains(stage))
                and "importance" not in self.manifest.stage(method, stage))

    def _submit_importance(self, method: str, stage: int, checkpoint: str):
        t, config = self.spec.train, self.spec.methods[method]
        earlier = [self.domains[name].train for name in self.spec.earlier_domains(stage)]
        settings = {"batches": config.importance_batches, "batch_size": t.batch_size, "max_length": t.max_length,
                    "seed": self.spec.seed * 1000 + stage}
        task = _importance_task.options(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0)
        return task.remote(checkpoint, self.units, earlier, settings)

    def _ray_name(self, what: str) -> str:
        """A unique Ray Train run name (reusing one resumes that old run), new per attempt."""
        return f"{what}-{self.output_dir.name}" + (f"-r{self.manifest.attempt}" if self.manifest.attempt else "")

    def _base_checkpoint(self) -> str:
        """The base model as a checkpoint; pretrained on `pretrain.domains` when asked."""
        trust = self.spec.model.trust_remote_code
        structure = meta_model(self.spec.model.source, trust)
        self.model_type = structure.config.model_type
        self.units = model_units(structure)
        if self.manifest.base.get("checkpoint"):
            return self.manifest.base["checkpoint"]
        model = load_model(self.spec.model.source, seed=self.spec.seed, trust_remote_code=trust)
        path = str(write_checkpoint(self.output_dir / "base", model, load_tokenizer(self.spec.model.source, trust)))
        pretrain = self.spec.pretrain
        if pretrain is None:
            return path
        examples = mix_balanced([self.domains[name].train for name in pretrain.domains])
        self.echo(f"[hft-ray] pretrain on {', '.join(pretrain.domains)}: {pretrain.steps} steps")
        job = self._job("pretrain", path, examples, pretrain.steps, pretrain.lr, self.spec.seed, None)
        # Pretraining runs alone: give its workers this node's CPUs rather than one each.
        cpus = max(self.spec.train.cpus_per_worker,
                   min(ray.available_resources().get("CPU", 1), os.cpu_count() or 1) // self.spec.train.workers)
        result = self._wait_one(self._submit_stage(job, self._ray_name("pretrain"), cpus), "pretrain")
        self.echo(f"[hft-ray] pretrain done: loss {result.losses[-1]:.4f} in {result.train_s:.0f}s")
        return result.checkpoint

    def _record_base(self, checkpoint: str) -> str:
        self.manifest.base["checkpoint"] = checkpoint
        self.manifest.save()
        return checkpoint

    def _wait_one(self, ref, what: str):
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as error:
            raise PipelineFailure(f"{what} failed: {_cause(error)}; logs under {self.storage}") from None

    # -- the DAG ----------------------------------------------------------------------------------

    def run(self) -> PipelineResult:
        spec = self.spec
        if self.manifest.parent_run_id:
            self.parent_id = self.manifest.parent_run_id
            self.tracker.reopen(self.parent_id, self.manifest.attempt)
        else:
            self.parent_id = self.tracker.start_pipeline(spec.name, spec.model_dump(mode="json"), self.pipeline_text,
                                                         spec.model_dump(mode="json"), str(self.output_dir))
            self.manifest.parent_run_id = self.parent_id
        self.manifest.save()
        open_runs = [self.parent_id]
        self.echo(f"[hft-ray] MLflow parent run {self.parent_id} in experiment {spec.experiment!r} "
                  f"({self.tracker.tracking_uri})")
        try:
            result = self._run(open_runs)
        except BaseException as error:
            reason = str(error) or type(error).__name__
            for run_id in open_runs:
                self.tracker.fail(run_id, reason)
            raise
        self.tracker.finish(self.parent_id)
        return result

    def _run(self, open_runs: list[str]) -> PipelineResult:
        spec, manifest = self.spec, self.manifest
        total = len(spec.stages)
        base = self._record_base(self._base_checkpoint())
        base_scores = manifest.base.get("scores")
        pending: dict = {} if base_scores else {self._submit_eval(base): ("base", None, 0)}
        branches = {}
        for method in spec.methods:  # on resume: skip what the manifest says is done
            done = manifest.finished_stages(method)
            stages = {i: manifest.stage(method, i) for i in range(1, done + 1)}
            branch = Branch(method, stages[done]["checkpoint"] if done else base, done,
                            rows={i: e["row"] for i, e in stages.items() if e.get("row")},
                            run_ids={i: e["run_id"] for i, e in stages.items()})
            branches[method] = branch
            for index in set(stages) - set(branch.rows):  # trained, not yet evaluated
                open_runs.append(branch.run_ids[index])
                self.tracker.reopen(branch.run_ids[index], manifest.attempt)
                pending[self._submit_eval(stages[index]["checkpoint"])] = ("eval", branch, index)
            if done:
                self.echo(f"[hft-ray] {method}: stages 1-{done} done in an earlier attempt")

        slots, queued = self._stage_slots(), []  # queued: (job, run name, branch, index) waiting for a slot

        def train(job: StageJob, name: str, branch: Branch, index: int) -> None:
            if sum(kind == "stage" for kind, _, _ in pending.values()) < slots:
                self.echo(f"[hft-ray] {job.label}: training {job.steps} steps on {spec.train.workers} worker(s)")
                pending[self._submit_stage(job, name)] = ("stage", branch, index)
            else:
                self.echo(f"[hft-ray] {job.label}: waiting for a free slot ({slots} stage(s) train at once here)")
                queued.append((job, name, branch, index))

        def submit_next(branch: Branch) -> None:
            index = branch.done + 1
            stage = spec.stages[index - 1]
            if self._needs_importance(branch.method, index):
                self.echo(f"[hft-ray] {branch.method} stage {index}/{total}: measuring importance on "
                          f"{', '.join(spec.earlier_domains(index))}")
                pending[self._submit_importance(branch.method, index, branch.checkpoint)] = ("importance", branch, index)
                return
            if getattr(spec.methods[branch.method], "strategy", "") == "importance" and not spec.earlier_domains(index):
                self.echo(f"[hft-ray] {branch.method} stage 1/{total}: nothing learnt earlier to protect "
                          "(no pretrain block): a random draw")
            plan = self._plan(branch.method, index)
            lora, replay = self._lora(branch.method), self._replay(branch.method, index)
            reselect_every = getattr(spec.methods[branch.method], "reselect_every", 0)
            entry = manifest.stage(branch.method, index)
            if entry.get("run_id"):  # its training died with the driver: train again, same child run
                self.tracker.reopen(entry["run_id"], manifest.attempt)
            else:
                selection = {"kind": spec.methods[branch.method].kind}
                if plan:
                    selection.update({k: plan[k] for k in ("granularity", "ratio", "seed", "stage", "strategy")})
                    selection["trained_fraction_by_params"] = plan["fractions"]["by_params"]["overall"]
                    selection["trained_fraction_by_matrices"] = plan["fractions"]["by_matrices"]["overall"]
                selection.update(lora or {})
                if reselect_every:
                    selection["reselect_every"] = reselect_every
                if replay:
                    selection["replay"] = replay
                entry["run_id"] = self.tracker.start_stage(self.parent_id, branch.method, index, stage.domain,
                                                           selection)
                manifest.save()
            branch.run_ids[index] = entry["run_id"]
            open_runs.append(entry["run_id"])
            label = f"{branch.method} stage {index}/{total} ({stage.domain})"
            job = self._job(label, branch.checkpoint, self._stage_examples(branch.method, index), stage.steps,
                            spec.stage_lr(stage), spec.seed * 1000 + index, plan, stage.kind, stage.beta,
                            lora, reselect_every)
            train(job, self._ray_name(f"{branch.method}-stage{index}"), branch, index)

        for branch in branches.values():
            if branch.done < total:
                submit_next(branch)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            kind, branch, index = pending.pop(ready[0])
            what = "base evaluation" if kind == "base" else f"{branch.method} stage {index} {kind}"
            value = self._wait_one(ready[0], what)
            if kind == "base":
                base_scores = manifest.base["scores"] = value
                manifest.save()
                self.echo(f"[hft-ray] base: {self._row_text(value)}")
            elif kind == "importance":
                manifest.stage(branch.method, index)["importance"] = value
                manifest.save()
                top = sorted(value, key=value.get, reverse=True)[:3]
                self.echo(f"[hft-ray] {branch.method} stage {index}/{total}: most important to earlier domains: "
                          f"{', '.join(top)}")
                submit_next(branch)
            elif kind == "stage":
                self.tracker.log_training(branch.run_ids[index], value.losses, value.train_s, value.step_s,
                                          self._trained(branch.method, index))
                manifest.stage(branch.method, index)["checkpoint"] = value.checkpoint
                manifest.save()
                self.echo(f"[hft-ray] {branch.method} stage {index}/{total} done: loss {value.losses[-1]:.4f}, "
                          f"{value.train_s:.0f}s, {value.step_s * 1000:.0f} ms/step, "
                          f"{value.trainable / value.total:.0%} of parameters trained")
                branch.checkpoint, branch.done = value.checkpoint, index
                if queued:
                    train(*queued.pop(0))
                pending[self._submit_eval(value.checkpoint)] = ("eval", branch, index)
                if index < total:
                    submit_next(branch)
            else:
                branch.rows[index] = value
                metric = spec.eval.metric
                self.tracker.log_metrics(branch.run_ids[index], {
                    **{f"eval/{d}": s[metric] for d, s in value.items()},
                    **{f"eval_all/{d}/{m}": v for d, s in value.items() for m, v in s.items()},
                })
                self.tracker.finish(branch.run_ids[index])
                open_runs.remove(branch.run_ids[index])
                manifest.stage(branch.method, index)["row"] = value
                manifest.save()
                self.echo(f"[hft-ray] {branch.method} after stage {index}: {self._row_text(value)}")
        return self._finish(branches, base_scores)

    def _row_text(self, row: dict[str, dict[str, float]]) -> str:
        metric = self.spec.eval.metric
        return "  ".join(f"{d}={s[metric]:.2f}" for d, s in row.items())

    def _finish(self, branches: dict[str, Branch], base_scores) -> PipelineResult:
        from hft_ray.plots import comparison, heatmap

        columns = list(self.spec.domains)
        stage_domains = [s.domain for s in self.spec.stages]
        matrices, summaries = {}, {}
        with tempfile.TemporaryDirectory() as folder:
            for method, branch in branches.items():
                rows = [base_scores] + [branch.rows[i] for i in range(1, len(stage_domains) + 1)]
                for metric in ("exact_match", "token_accuracy"):
                    matrix = ForgettingMatrix.build(columns, stage_domains,
                                                    [[row[c][metric] for c in columns] for row in rows])
                    suffix = "" if metric == self.spec.eval.metric else f".{metric}"
                    self.tracker.log_json(self.parent_id, matrix.to_dict(), f"forgetting/{method}{suffix}.json")
                    self.tracker.log_text(self.parent_id, matrix.to_csv(), f"forgetting/{method}{suffix}.csv")
                    if not suffix:
                        matrices[method] = matrix
                png = Path(folder) / f"{method}.png"
                heatmap(matrices[method], f"{self.spec.name}: {method} ({self.spec.eval.metric})", png)
                self.tracker.log_file(self.parent_id, png, "forgetting")
                summaries[method] = summary(matrices[method])
                self.tracker.log_metrics(self.parent_id, {f"{method}.{k}": v for k, v in summaries[method].items()})
            png = Path(folder) / "comparison.png"
            comparison(matrices, png, title=f"{self.spec.name}: methods compared ({self.spec.eval.metric})")
            self.tracker.log_file(self.parent_id, png, "forgetting")
        (self.output_dir / "result.json").write_text(json.dumps(
            {m: {"matrix": matrices[m].to_dict(), "summary": summaries[m]} for m in matrices}, indent=1))
        return PipelineResult(self.parent_id, str(self.output_dir), matrices, summaries)


def resumable(tracker: Tracker, spec: PipelineSpec, run_id: str | None) -> Manifest:
    """The manifest of the run `hft-ray run --resume [RUN_ID]` continues; UserError if none fits."""
    try:
        run = tracker.find_resumable(spec.name, run_id)
    except Exception as error:  # mlflow raises its own exception for an unknown id
        raise UserError(f"--resume {run_id}: no such run in {tracker.tracking_uri} ({str(error).splitlines()[0]})") from None
    if run is None:
        raise UserError(f"--resume: no unfinished run of pipeline {spec.name!r} in experiment {spec.experiment!r} "
                        f"({tracker.tracking_uri}); start one without --resume")
    name, status = run.info.run_id, run.info.status
    if run.data.tags.get("hft.kind") != "pipeline" or run.data.tags.get("hft.pipeline") != spec.name:
        raise UserError(f"--resume {name}: not a run of pipeline {spec.name!r}")
    if status == "FINISHED":
        raise UserError(f"--resume {name}: that run FINISHED; nothing to resume")
    folder = Path(run.data.tags.get("hft.output_dir", ""))
    if not (folder / MANIFEST_FILE).is_file():
        raise UserError(f"--resume {name}: its manifest {folder / MANIFEST_FILE} is not there "
                        "(was output.dir moved or removed?)")
    manifest = Manifest.load(folder)
    if manifest.spec_sha256 != spec_digest(spec.model_dump(mode="json")):
        raise UserError(f"--resume {name}: the pipeline (file and --set overrides) differs from the one that run "
                        f"started with; resume with the same ones (logged as its pipeline.yaml artifact)")
    if manifest.driver_alive():
        raise UserError(f"--resume {name}: its driver (pid {manifest.driver['pid']}) is still running")
    return manifest


def _cause(error: BaseException) -> str:
    """The innermost message of a Ray error chain, in one line."""
    cause = getattr(error, "cause", None) or error.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause or error).strip().splitlines()
    return text[-1] if text else type(error).__name__
