"""Ray Tune over the selection: each trial is one HFT branch (every stage of a pipeline) with a
sampled granularity, ratio (and optionally lr, selection seed, select_embeddings).

    space file -> validated TuneSpace -> pipeline (+ `set:`) -> preflight
      -> driver: base model (+ pretrain) and its eval row 0, once
      -> Tune trials (function trainable, 0 CPUs: it only waits on its TorchTrainers):
           stage i: run_stage (one TorchTrainer) -> evaluate every domain -> tune.report
      -> driver callback: MLflow parent (hft.kind=tune) + one child run per trial
      -> results.csv, objective_vs_ratio.png, best_config.json, a ready best pipeline file

Only the driver writes to MLflow (`TrialLogger`, a Tune Callback): trials report to Tune.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hft_ray.errors import UserError
from hft_ray.metrics import ForgettingMatrix, summary
from hft_ray.selection import GRANULARITIES, STRATEGIES
from hft_ray.spec import FileSource, HFTMethod, PipelineSpec, parse_spec, parse_yaml, read_yaml, set_override

TRIAL_CPUS = 0.01
IMPORTANCE_BATCHES = HFTMethod.model_fields["importance_batches"].default
OBJECTIVE_METRICS = ("OP", "BWT", "forgetting", "heldout_delta", "OP+BWT")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampler(Strict):
    """A sampled key: each trial draws from {choice: [...]}, {uniform: [lo, hi]} or
    {loguniform: [lo, hi]} (exactly one of them)."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_and_ordered(self):
        given = [k for k in ("choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform (got {', '.join(given) or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not 0 < bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: {list(bounds)!r}; need 0 < low < high")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform") if getattr(self, k) is not None)


Granularity = Literal[GRANULARITIES]  # type: ignore[valid-type]

# Which samplers each key takes (a list, i.e. a grid, is always allowed).
_SAMPLERS = {"granularity": ("choice",), "ratio": ("choice", "uniform"), "lr": ("choice", "loguniform"),
             "seed": ("choice",), "select_embeddings": ("choice",), "reselect_every": ("choice",),
             "strategy": ("choice",)}
SEARCHED = tuple(_SAMPLERS)  # the keys a space may search


class Space(Strict):
    """A list is a grid (every value, in every combination); a Sampler is drawn per trial."""

    granularity: list[Granularity] | Sampler = Field(["category"], description="grid list or {choice: [...]}")
    ratio: list[Annotated[float, Field(gt=0, lt=1)]] | Sampler = Field([0.5], description="grid, choice or uniform")
    lr: list[Annotated[float, Field(gt=0)]] | Sampler | None = Field(None, description="default: the pipeline's")
    seed: list[int] | Sampler | None = Field(None, description="selection seed; default: the pipeline's seed")
    select_embeddings: list[bool] | Sampler | None = None
    reselect_every: list[Annotated[int, Field(ge=0)]] | Sampler | None = Field(
        None, description="periodic re-selection: a new plan every N steps (0: one plan per stage)")
    strategy: list[Literal[STRATEGIES]] | Sampler | None = Field(  # type: ignore[valid-type]
        None, description="random (the paper's draw) or importance (freeze what earlier domains need most)")

    @field_validator("*", mode="before")
    @classmethod
    def _scalar_is_one_value(cls, value):
        return value if isinstance(value, (list, dict)) or value is None else [value]

    @field_validator("*")
    @classmethod
    def _sampler_fits(cls, value, info):
        if not isinstance(value, Sampler):
            return value
        allowed = _SAMPLERS[info.field_name]
        if value.kind not in allowed:
            raise ValueError(f"{value.kind}: not for {info.field_name}; use a list (grid) or "
                             f"{' or '.join(allowed)}")
        if value.choice is not None:
            bad = {"granularity": lambda v: v not in GRANULARITIES,
                   "ratio": lambda v: not isinstance(v, (int, float)) or not 0 < v < 1,
                   "lr": lambda v: not isinstance(v, (int, float)) or v <= 0,
                   "seed": lambda v: not isinstance(v, int) or isinstance(v, bool),
                   "select_embeddings": lambda v: not isinstance(v, bool),
                   "reselect_every": lambda v: not isinstance(v, int) or isinstance(v, bool) or v < 0,
                   "strategy": lambda v: v not in STRATEGIES}[info.field_name]
            wrong = [v for v in value.choice if bad(v)]
            if wrong:
                valid = {"granularity": ", ".join(GRANULARITIES), "ratio": "numbers in (0, 1)", "lr": "numbers > 0",
                         "seed": "integers", "select_embeddings": "true or false",
                         "reselect_every": "integers >= 0", "strategy": ", ".join(STRATEGIES)}[info.field_name]
                raise ValueError(f"choice: {wrong!r} not valid; use {valid}")
        if value.uniform is not None and not value.uniform[1] < 1:
            raise ValueError(f"uniform: {list(value.uniform)!r}; a ratio needs 0 < low < high < 1")
        return value

    def values(self, key: str) -> list:
        """Every value `key` may take in a trial (a grid's list, a choice's options)."""
        value = getattr(self, key)
        return value if isinstance(value, list) else (value.choice or []) if isinstance(value, Sampler) else []

    @model_validator(mode="after")
    def _importance_combines(self):
        """Importance ranks whole matrices and draws one plan per stage: refuse trials that could
        pair it with element granularity or periodic re-selection."""
        if "importance" in self.values("strategy"):
            if "element" in self.values("granularity"):
                raise ValueError("strategy: 'importance' ranks whole matrices and cannot pair with granularity "
                                 "element; search element in a separate space")
            if any(self.values("reselect_every")):
                raise ValueError("strategy: 'importance' draws one plan per stage and cannot pair with "
                                 "reselect_every > 0; search them in separate spaces")
        return self


class Objective(Strict):
    metric: Literal[OBJECTIVE_METRICS] = Field("OP", description="OP+BWT is OP + bwt_weight * BWT")  # type: ignore[valid-type]
    bwt_weight: float = Field(1.0, ge=0)
    mode: Literal["max", "min"] | None = Field(None, description="default: min for forgetting, else max")

    @property
    def direction(self) -> str:
        return self.mode or ("min" if self.metric == "forgetting" else "max")


class Fifo(Strict):
    kind: Literal["fifo"]


class Asha(Strict):
    kind: Literal["asha"]
    grace_period: int = Field(1, gt=0, description="stages every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class TuneSpace(Strict):
    pipeline: str = Field(description="pipeline file, relative to the space file")
    set: dict[str, Any] = Field({}, description="overrides of the pipeline: key.path -> value")
    space: Space = Space()
    objective: Objective = Objective()
    num_samples: int = Field(1, gt=0, description="times the grid is repeated (sampled keys drawn anew)")
    max_concurrent: int = Field(2, gt=0)
    scheduler: Annotated[Fifo | Asha, Field(discriminator="kind")] = Fifo(kind="fifo")


@dataclass(frozen=True)
class LoadedSpace:
    space: TuneSpace
    pipeline_path: Path
    pipeline_data: dict          # the pipeline after `set:`, methods as written
    spec: PipelineSpec
    text: str                    # the space file as written


def _format_error(error: dict) -> str:
    # Union members show up in `loc` by type name (list[...], Choice, ...): not keys the user wrote.
    loc = [str(p) for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p[:1].isupper()))]
    if loc[:1] == ["scheduler"] and loc[1:2] in (["fifo"], ["asha"]):
        del loc[1]  # the tag of the scheduler union
    key = ".".join(loc) or "(top)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; valid keys: pipeline, set, space ({', '.join(SEARCHED)}), objective (metric, bwt_weight, mode), num_samples, max_concurrent, " \
               f"scheduler (kind, grace_period, reduction_factor)"
    if error["type"] == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        # "choice: [...] not valid" from a sampler's check names its own sub-key.
        return f"{key}.{message}" if re.match(r"^\w+: ", message) else f"{key}: {message}"
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    return f"{key}: {error['msg']}{shown}"


def _is_union_noise(error: dict) -> bool:
    """A union reports every member's failure; keep those of the member the user wrote
    (a list where a list was written, a mapping where a mapping was)."""
    member = next((p for p in error["loc"] if isinstance(p, str) and ("[" in p or p[:1].isupper())), None)
    if member is None:
        return False
    written = error.get("input")
    if error["type"] in ("model_type", "dict_type", "model_attributes_type") and isinstance(written, list):
        return True
    return error["type"] == "list_type" and isinstance(written, dict)


def _flatten_set(data: Any, prefix: str = "") -> dict[str, Any]:
    """`set:` may be written flat (train.lr: 1e-3) or nested (train: {lr: 1e-3})."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(_flatten_set(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def parse_space(data: Any, source: str) -> TuneSpace:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping (pipeline, set, space, objective, num_samples, ...)")
    if isinstance(data.get("scheduler"), str):  # `scheduler: asha` is short for {kind: asha}
        data = {**data, "scheduler": {"kind": data["scheduler"]}}
    try:
        return TuneSpace.model_validate(data)
    except ValidationError as error:
        problems = []
        errors = error.errors()
        for e in errors:
            if e["type"] == "union_tag_invalid":
                problems.append(f"scheduler.kind: {e['input'].get('kind')!r} is not a scheduler; use fifo or asha")
            elif not _is_union_noise(e):
                problems.append(_format_error(e))
        if not problems:
            problems = [_format_error(e) for e in errors]
        # A union reports one error per member; keep each message once.
        raise UserError(*dict.fromkeys(problems)) from None


def load_space(path: str | Path, overrides: list[str] = ()) -> LoadedSpace:
    """The validated space and its pipeline (with `set:` applied); every problem named at once."""
    path = Path(path)
    data, text = read_yaml(path, "space", overrides)
    space = parse_space(data, str(path))
    pipeline_path = (path.parent / space.pipeline).resolve()
    if not pipeline_path.is_file():
        raise UserError(f"pipeline: {space.pipeline!r} does not exist (looked for {pipeline_path}; "
                        "a relative path is relative to the space file)")
    try:
        pipeline_data = parse_yaml(pipeline_path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"pipeline: {pipeline_path} is not valid YAML: {error}") from None
    problems = []
    if isinstance(pipeline_data, dict):
        for key, value in _flatten_set(space.set).items():
            try:
                set_override(pipeline_data, f"{key}={json.dumps(value)}")
            except UserError:
                problems.append(f"set.{key}: {value!r} does not name an entry of the pipeline {pipeline_path.name}")
    try:
        spec = parse_spec(pipeline_data, str(pipeline_path))
    except UserError as error:
        problems += [f"pipeline {pipeline_path.name} (after set): {p}" for p in error.problems]
        spec = None
    if spec is not None:
        trained = {s.domain for s in spec.stages}
        if space.objective.metric == "heldout_delta" and set(spec.domains) <= trained:
            problems.append("objective.metric: 'heldout_delta' needs a domain no stage trains; "
                            f"the pipeline trains all of {', '.join(spec.domains)}")
        if space.space.reselect_every is not None and spec.train.workers > 1:
            problems.append(f"space.reselect_every: periodic re-selection runs on one worker; the pipeline has "
                            f"train.workers: {spec.train.workers}; add set: {{train.workers: 1}}")
        if space.objective.metric in ("BWT", "forgetting", "OP+BWT") and len(spec.stages) < 2:
            problems.append(f"objective.metric: {space.objective.metric!r} needs 2 or more stages; "
                            f"the pipeline has {len(spec.stages)}; use OP")
    if problems:
        raise UserError(*problems)
    return LoadedSpace(space, pipeline_path, pipeline_data, spec, text)


# -- the search space and the objective ----------------------------------------------------------

def param_space(space: Space) -> dict:
    """The Tune param_space: lists -> grid_search, choice/uniform/loguniform -> samplers."""
    from ray import tune  # Ray

    def convert(value):
        if isinstance(value, list):
            return tune.grid_search(value)
        if isinstance(value, Sampler):
            return {"choice": lambda: tune.choice(value.choice), "uniform": lambda: tune.uniform(*value.uniform),
                    "loguniform": lambda: tune.loguniform(*value.loguniform)}[value.kind]()
        return value

    return {key: convert(getattr(space, key)) for key in Space.model_fields if getattr(space, key) is not None}


def objective_value(objective: Objective, values: dict[str, float]) -> float:
    """The objective from a (partial) matrix's summary. BWT and forgetting are undefined after
    one stage; nothing has been forgotten yet, so they count as 0 there (Tune needs a number
    at every report for ASHA to compare trials)."""
    get = lambda key: values.get(key, 0.0)  # noqa: E731
    if objective.metric == "OP+BWT":
        return get("OP") + objective.bwt_weight * get("BWT")
    return get(objective.metric)


# -- one trial (runs in a Tune trial actor) --------------------------------------------------------

@dataclass(frozen=True)
class TrialContext:
    """What every trial shares, put once into the object store by tune.with_parameters."""

    spec: PipelineSpec
    base_checkpoint: str
    base_row: dict[str, dict[str, float]]
    units: list
    model_type: str
    train_sets: dict[str, tuple]
    eval_sets: dict[str, list]
    storage: str                 # Ray Train storage of the stages
    search_name: str
    objective: Objective


def run_trial(config: dict, context: TrialContext) -> None:
    """One HFT branch: every stage with the sampled selection; a report to Tune after each."""
    import torch
    from ray import tune  # Ray

    from hft_ray.checkpoints import load_checkpoint
    from hft_ray.evaluation import evaluate_domain
    from hft_ray.importance import measure
    from hft_ray.selection import plan_units
    from hft_ray.stage import StageJob, run_stage

    torch.set_num_threads(1)  # tiny models; two OpenMP pools on 2 cores slow each other down
    spec, train = context.spec, context.spec.train
    trial_id = tune.get_context().get_trial_id()  # Ray
    seed = config.get("seed", spec.seed)
    checkpoint, rows = context.base_checkpoint, [context.base_row]
    columns, total = list(spec.domains), len(spec.stages)
    metric = spec.eval.metric
    for index, stage in enumerate(spec.stages, start=1):
        scores = None
        if config.get("strategy") == "importance" and spec.earlier_domains(index):
            scores = measure(checkpoint, context.units, [context.train_sets[d] for d in spec.earlier_domains(index)],
                             batches=IMPORTANCE_BATCHES, batch_size=train.batch_size, max_length=train.max_length,
                             seed=spec.seed * 1000 + index)
        plan = plan_units(context.units, context.model_type, config["granularity"], config["ratio"], seed, index,
                          config.get("select_embeddings", False), scores=scores).to_dict()
        lr = config.get("lr", spec.stage_lr(stage))
        job = StageJob(label=f"trial {trial_id} stage {index}/{total} ({stage.domain})", init_checkpoint=checkpoint,
                       examples=context.train_sets[stage.domain], steps=stage.steps, lr=lr,
                       batch_size=train.batch_size, max_length=train.max_length, weight_decay=train.weight_decay,
                       seed=seed * 1000 + index, log_every=train.log_every, plan=plan,
                       checkpoint_every=train.checkpoint_every, kind=stage.kind, beta=stage.beta,
                       reselect_every=config.get("reselect_every", 0))
        # A unique name per TorchTrainer run: reusing (storage, name) would resume an old run.
        result = run_stage(job, context.storage, f"{context.search_name}-{trial_id}-stage{index}",
                           train.workers, train.cpus_per_worker, train.use_gpu, train.max_failures)
        checkpoint = result.checkpoint
        model, tokenizer = load_checkpoint(checkpoint)
        row = {name: evaluate_domain(model, tokenizer, examples, max_new_tokens=spec.eval.max_new_tokens,
                              batch_size=spec.eval.batch_size)
               for name, examples in context.eval_sets.items()}
        rows.append(row)
        domains = [s.domain for s in spec.stages[:index]]
        matrix = ForgettingMatrix.build(columns, domains, [[r[c][metric] for c in columns] for r in rows])
        values = summary(matrix)
        # ASHA may stop the trial at this report (the actor is killed): everything the driver
        # logs for this stage travels in it.
        tune.report({  # Ray
            "stage": index, "objective": objective_value(context.objective, values),
            **{k: v for k, v in values.items()},
            **{f"eval/{d}": s[metric] for d, s in row.items()},
            "train/loss": result.losses[-1], "time/train_s": result.train_s, "time/step_s": result.step_s,
            "trained_fraction_by_params": plan["fractions"]["by_params"]["overall"],
            "trained_fraction_by_matrices": plan["fractions"]["by_matrices"]["overall"],
            "matrix": json.dumps(matrix.to_dict()),
        })


# -- the driver's MLflow writer --------------------------------------------------------------------

def _trial_config(trial) -> dict:
    return {k: trial.config[k] for k in Space.model_fields if k in trial.config}


def make_trial_logger(tracker, parent_id: str, total_stages: int, echo: Callable[[str], None]):
    """A Tune Callback (its hooks run in the driver) that writes each trial's child run."""
    from ray.tune import Callback  # Ray

    class TrialLogger(Callback):
        def __init__(self):
            self.run_ids: dict[str, str] = {}
            self.last: dict[str, dict] = {}
            self.outcome: dict[str, str] = {}
            self.configs: dict[str, dict] = {}  # trials that started, in start order

        def _run(self, trial) -> str:
            if trial.trial_id not in self.run_ids:
                config = _trial_config(trial)
                name = "trial " + " ".join(f"{k}={_short(v)}" for k, v in config.items())
                run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags={
                    "mlflow.parentRunId": parent_id, "hft.kind": "trial", "hft.trial_id": trial.trial_id})
                tracker.log_params(run.info.run_id, config)
                self.configs[trial.trial_id] = config
                self.run_ids[trial.trial_id] = run.info.run_id
            return self.run_ids[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)
            echo(f"[hft-ray] trial {trial.trial_id} started: {_trial_config(trial)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run_id = self._run(trial)
            stage = int(result["stage"])
            numbers = {k: v for k, v in result.items() if k in _LOGGED or k.startswith("eval/")}
            tracker.log_metrics(run_id, numbers, step=stage)
            self.last[trial.trial_id] = result
            echo(f"[hft-ray] trial {trial.trial_id} stage {stage}/{total_stages}: objective {result['objective']:.4f}"
                 f" (OP {result.get('OP', math.nan):.3f}, BWT {result.get('BWT', math.nan):+.3f})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            if trial.trial_id not in self.run_ids:
                return  # never started (the search ended first): no run to close
            run_id = self.run_ids[trial.trial_id]
            result = self.last.get(trial.trial_id)
            if result is not None:
                tracker.log_json(run_id, json.loads(result["matrix"]), "forgetting/trial.json")
            done = int(result["stage"]) if result else 0
            if done < total_stages:
                tracker.client.set_tag(run_id, "hft.stopped_early", "true")
                tracker.client.set_tag(run_id, "hft.stages_done", str(done))
                tracker.client.set_terminated(run_id, "KILLED")
                self.outcome[trial.trial_id] = "stopped_early"
                echo(f"[hft-ray] trial {trial.trial_id} stopped early after stage {done} (scheduler)")
            else:
                tracker.client.set_tag(run_id, "hft.stopped_early", "false")
                tracker.finish(run_id)
                self.outcome[trial.trial_id] = "finished"

        def on_trial_error(self, iteration, trials, trial, **info):
            run_id = self._run(trial)
            tracker.fail(run_id, f"trial failed; logs in {trial.local_path or trial.path}")
            self.outcome[trial.trial_id] = "error"
            echo(f"[hft-ray] trial {trial.trial_id} failed; logs in {trial.local_path or trial.path}")

    return TrialLogger()


_LOGGED = ("objective", "OP", "BWT", "FWT", "forgetting", "heldout_delta", "train/loss", "time/train_s",
           "time/step_s", "trained_fraction_by_params", "trained_fraction_by_matrices")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- the search ------------------------------------------------------------------------------------

@dataclass
class TuneResult:
    parent_run_id: str
    output_dir: str
    rows: list[dict]             # one per trial (results.csv)
    best: dict | None            # the best finished trial's row
    best_pipeline: str | None    # path of the ready pipeline file

    def to_json(self) -> dict:
        return {"parent_run_id": self.parent_run_id, "output_dir": self.output_dir, "trials": self.rows,
                "best": self.best, "best_pipeline": self.best_pipeline}


RESULT_COLUMNS = ("trial_id", *SEARCHED, "status", "stages_done",
                  "objective", "OP", "BWT", "FWT", "forgetting", "heldout_delta", "run_id")


def run_search(loaded: LoadedSpace, prepared, tracker, num_samples: int | None = None,
               echo: Callable[[str], None] = print) -> TuneResult:
    """The whole search; MLflow parent run ended FINISHED, or FAILED with the reason."""
    space, spec = loaded.space, prepared.spec
    parent_id = tracker.client.create_run(tracker.experiment_id, run_name=f"tune {loaded.pipeline_path.stem}",
                                          tags={"hft.kind": "tune", "hft.pipeline": spec.name}).info.run_id
    echo(f"[hft-ray] MLflow parent run {parent_id} in experiment {spec.experiment!r} ({tracker.tracking_uri})")
    try:
        tracker.log_params(parent_id, {"space": space.model_dump(mode="json", exclude={"set"}),
                                       "pipeline": str(loaded.pipeline_path),
                                       "num_samples": num_samples or space.num_samples,
                                       **{f"set.{k}": v for k, v in _flatten_set(space.set).items()}})
        tracker.log_text(parent_id, loaded.text, "space.yaml")
        tracker.log_text(parent_id, yaml.safe_dump(loaded.pipeline_data, sort_keys=False), "pipeline.yaml")
        result = _search(loaded, prepared, tracker, parent_id, num_samples or space.num_samples, echo)
    except BaseException as error:
        tracker.fail(parent_id, str(error) or type(error).__name__)
        raise
    tracker.finish(parent_id)
    return result


def _search(loaded: LoadedSpace, prepared, tracker, parent_id: str, num_samples: int, echo) -> TuneResult:
    from ray import tune  # Ray

    from hft_ray.pipeline import PipelineRun

    space, spec = loaded.space, prepared.spec
    stamp = time.strftime("%Y%m%d-%H%M%S")
    search_name = f"{spec.name}-tune-{stamp}-{os.getpid()}"
    output_dir = Path(spec.output.dir).resolve() / search_name
    # The base model and row 0 once, in the driver, exactly as `hft-ray run` makes them.
    base = PipelineRun(prepared, loaded.text, tracker, echo)
    base.output_dir, base.storage = output_dir, str(output_dir / "ray")
    base_checkpoint = base._base_checkpoint()
    base_row = base._wait_one(base._submit_eval(base_checkpoint), "base evaluation")
    echo(f"[hft-ray] base: " + "  ".join(f"{d}={s[spec.eval.metric]:.2f}" for d, s in base_row.items()))
    context = TrialContext(spec=spec, base_checkpoint=base_checkpoint, base_row=base_row, units=base.units,
                           model_type=base.model_type,
                           train_sets={name: tuple(prepared.domains[name].train) for name in
                                       [s.domain for s in spec.stages] + (spec.pretrain.domains if spec.pretrain else [])},
                           eval_sets=base.eval_sets, storage=base.storage, search_name=search_name,
                           objective=space.objective)
    total = len(spec.stages)
    logger = make_trial_logger(tracker, parent_id, total, echo)
    mode = space.objective.direction
    scheduler = None
    if space.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler  # Ray

        # time_attr counts reports, i.e. stages; max_t = the pipeline's stages.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=total,
                                  grace_period=min(space.scheduler.grace_period, total),
                                  reduction_factor=space.scheduler.reduction_factor)
    # A sliver of a CPU for the trial actor: it mostly waits on its TorchTrainer, whose workers
    # hold the CPUs (a trial holding a whole CPU starves its own Train workers on 2 CPUs).
    # Not 0: Tune rejects a resource request whose only bundle is empty.
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": TRIAL_CPUS})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(space.space),
        tune_config=tune.TuneConfig(metric="objective", mode=mode, num_samples=num_samples, scheduler=scheduler,
                                    max_concurrent_trials=space.max_concurrent),
        run_config=tune.RunConfig(name=search_name, storage_path=str(output_dir / "tune"), callbacks=[logger],
                                  verbose=0),
    )
    echo(f"[hft-ray] tune: {space.space.model_dump(exclude_none=True)} x {num_samples} sample(s), "
         f"{space.max_concurrent} at a time, scheduler {space.scheduler.kind}, objective "
         f"{space.objective.metric} ({mode})")
    grid = tuner.fit()

    rows = []
    for trial_id, config in logger.configs.items():
        last = logger.last.get(trial_id, {})
        rows.append({
            "trial_id": trial_id, **{k: config.get(k, "") for k in SEARCHED},
            "status": logger.outcome.get(trial_id, "error"), "stages_done": last.get("stage", 0),
            **{k: last.get(k, "") for k in ("objective", "OP", "BWT", "FWT", "forgetting", "heldout_delta")},
            "run_id": logger.run_ids[trial_id],
        })
    if not rows and any(r.error for r in grid):
        raise RuntimeError(f"every trial failed; logs under {output_dir / 'tune'}")
    finished = [r for r in rows if r["status"] == "finished"]
    best = (max if mode == "max" else min)(finished, key=lambda r: r["objective"]) if finished else None
    best_path = None
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "results.csv"
        table.write_text(_csv(rows))
        tracker.log_file(parent_id, table)
        plot = Path(folder) / "objective_vs_ratio.png"
        objective_vs_ratio(rows, plot, f"{spec.name}: {space.objective.metric} ({mode}) vs ratio")
        tracker.log_file(parent_id, plot)
    if best is not None:
        best_config = {k: best[k] for k in SEARCHED if best[k] != ""}
        tracker.log_json(parent_id, {"config": best_config, "objective": best["objective"],
                                     "trial_id": best["trial_id"], "run_id": best["run_id"]}, "best_config.json")
        tracker.log_params(parent_id, {f"best.{k}": v for k, v in best_config.items()})
        tracker.log_metrics(parent_id, {"best.objective": best["objective"]})
        best_path = output_dir / "best_pipeline.yaml"
        best_path.write_text(best_pipeline_text(loaded, best_config))
        tracker.log_file(parent_id, best_path)
    (output_dir / "results.csv").write_text(_csv(rows))
    return TuneResult(parent_id, str(output_dir), rows, best, str(best_path) if best_path else None)


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def best_pipeline_text(loaded: LoadedSpace, config: dict) -> str:
    """The searched pipeline (after `set:`) with methods {fft, best}: ready for `hft-ray run`."""
    data = json.loads(json.dumps(loaded.pipeline_data))  # a deep copy
    best = {"kind": "hft", "granularity": config["granularity"], "ratio": float(config["ratio"])}
    if config.get("select_embeddings"):
        best["select_embeddings"] = True
    if config.get("reselect_every"):
        best["reselect_every"] = int(config["reselect_every"])
    if config.get("strategy", "random") != "random":
        best["strategy"] = config["strategy"]
    data["methods"] = {"fft": {"kind": "fft"}, "best": best}
    if "lr" in config:
        data.setdefault("train", {})["lr"] = float(config["lr"])
        for stage in data.get("stages", []):
            stage.pop("lr", None)  # the tuned lr applied to every stage
    # Data paths were relative to the searched pipeline's folder; this file lives elsewhere.
    for domain in (data.get("domains") or {}).values():
        source = domain.get("source") if isinstance(domain, dict) else None
        if isinstance(source, dict) and "path" in source and not Path(source["path"]).is_absolute():
            source["path"] = str((loaded.pipeline_path.parent / source["path"]).resolve())
    header = (f"# Best selection found by: hft-ray tune (pipeline {loaded.pipeline_path})\n"
              f"#   {json.dumps(config)}\n# Run it with: hft-ray run <this file>\n")
    if "seed" in config:
        header += (f"# The search drew plans with selection seed {config['seed']}; `seed:` below is the pipeline's, "
                   "which also draws the base model and data, so it is kept.\n")
    text = header + yaml.safe_dump(data, sort_keys=False)
    parse_spec(yaml.safe_load(text), "best pipeline")  # never write a file `hft-ray run` would reject
    return text


def objective_vs_ratio(rows: list[dict], path: str | Path, title: str) -> None:
    """Objective against ratio, one series per granularity; trials stopped early hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    scored = [r for r in rows if r["objective"] != ""]
    for i, granularity in enumerate(sorted({r["granularity"] for r in scored})):
        points = sorted((float(r["ratio"]), float(r["objective"]), r["status"]) for r in scored
                        if r["granularity"] == granularity)
        done = [(x, y) for x, y, s in points if s == "finished"]
        colour = f"C{i % 10}"
        if done:
            ax.plot(*zip(*done), marker="o", color=colour, label=granularity)
        early = [(x, y) for x, y, s in points if s != "finished"]
        if early:
            ax.scatter(*zip(*early), facecolors="none", edgecolors=colour,
                       label=f"{granularity} (stopped early)")
    ax.set_xlabel("ratio (fraction trained per stage)")
    ax.set_ylabel("objective")
    ax.set_title(title)
    if scored:
        ax.legend(loc="best", fontsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
