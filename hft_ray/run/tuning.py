"""`hft-ray tune`: Ray Tune over the selection. Each trial is one branch (hft_ray/run/trial.py)
with a sampled method; the base model and its row are made once, here, as `hft-ray run` makes
them; the Tune driver alone writes MLflow (hft_ray/run/trial_logger.py).

    space file -> pipeline (+ `set:`) -> preflight -> base model (+ pretrain) and row 0, once
      -> trials, `max_concurrent` at a time (ASHA may stop trailing ones after a stage)
      -> results.csv, objective_vs_ratio.png, best_config.json, best_pipeline.yaml (ready for `run`)

`hft-ray tune --resume` restores the search (Ray Tune's restore): finished trials are kept, the
others go on from their last reported stage, into the same MLflow runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time

import yaml
from ray import tune

from hft_ray.config.preflight import Prepared
from hft_ray.config.space import SEARCHED, LoadedSpace, Sampler, Space, flatten_set
from hft_ray.errors import UserError
from hft_ray.run.base import make_bases
from hft_ray.run.cluster import Capacity
from hft_ray.run.layout import Layout
from hft_ray.run.manifest import Manifest
from hft_ray.run.progress import Board
from hft_ray.run.ray_worker import Scaling
from hft_ray.run.runner import EvalSettings, RayRunner, Services
from hft_ray.run.search_results import TuneResult, search_results
from hft_ray.run.tracking import SearchTracker
from hft_ray.run.trial import TrialContext, run_trial
from hft_ray.run.trial_logger import TrialLogger
from hft_ray.storage import Location

# A sliver of a CPU for the trial actor: it mostly waits on its branch's worker group, which holds
# the CPUs (a trial holding a whole CPU starves its own Train workers on 2 CPUs). Not 0: Tune
# rejects a resource request whose only bundle is empty.
TRIAL_CPUS = 0.01


def param_space(space: Space) -> dict:
    """The Tune param_space: lists -> grid_search, choice/uniform/loguniform -> samplers."""
    def convert(value):
        if isinstance(value, list):
            return tune.grid_search(value)
        if isinstance(value, Sampler):
            return {"choice": lambda: tune.choice(value.choice), "uniform": lambda: tune.uniform(*value.uniform),
                    "loguniform": lambda: tune.loguniform(*value.loguniform)}[value.kind]()
        return value

    return {key: convert(getattr(space, key)) for key in SEARCHED if getattr(space, key) is not None}


def search_digest(loaded: LoadedSpace, num_samples: int) -> str:
    text = json.dumps([loaded.space.model_dump(mode="json"), loaded.pipeline_data, num_samples], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def resumable_search(tracker: SearchTracker, loaded: LoadedSpace, run_id: str | None,
                     num_samples: int | None = None) -> Manifest:
    """The search `hft-ray tune --resume [RUN_ID]` continues; UserError if none fits."""
    name = loaded.spec.name
    try:
        run = tracker.find_resumable("tune", name, run_id)
    except Exception as error:  # mlflow raises its own exception for an unknown id
        raise UserError(f"--resume {run_id}: no such run in {tracker.tracking_uri} "
                        f"({str(error).splitlines()[0]})") from None
    if run is None or run.data.tags.get("hft.kind") != "tune":
        raise UserError(f"--resume{' ' + run_id if run_id else ''}: no unfinished search of pipeline {name!r} in "
                        f"experiment {loaded.spec.experiment!r} ({tracker.tracking_uri}); start one without --resume")
    if run.info.status == "FINISHED":
        raise UserError(f"--resume {run.info.run_id}: that search FINISHED; nothing to resume")
    folder = Location(run.data.tags.get("hft.output_dir", ""))
    if not (folder / "manifest.json").is_file() or not tune.Tuner.can_restore(*(folder / "tune").for_ray()):
        raise UserError(f"--resume {run.info.run_id}: its search state under {folder} is not there "
                        "(was output.dir moved or removed?)")
    manifest = Manifest.load(folder)
    if manifest.spec_sha256 != search_digest(loaded, num_samples or loaded.space.num_samples):
        raise UserError(f"--resume {run.info.run_id}: the space, its pipeline or --num-samples differ from those the "
                        "search started with; resume with the same ones (logged as its space.yaml and pipeline.yaml)")
    if manifest.driver_alive():
        raise UserError(f"--resume {run.info.run_id}: its driver (pid {manifest.driver['pid']}) is still running")
    return manifest


@contextlib.contextmanager
def _trial_lines_to(board: Board):
    """The trial logger's lines (hft_ray/run/trial_logger.py) onto the board."""
    handler = logging.Handler()
    handler.emit = lambda record: board.say(record.getMessage())
    log = logging.getLogger("hft_ray.tune")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)


def run_search(loaded: LoadedSpace, prepared: Prepared, tracker: SearchTracker, board: Board, capacity: Capacity,
               num_samples: int | None = None, resume: Manifest | None = None) -> TuneResult:
    """The whole search; its MLflow parent run ends FINISHED, or FAILED with the reason."""
    spec, space = prepared.spec, loaded.space
    samples = num_samples or space.num_samples
    if resume is None:
        name = f"{spec.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        resume = Manifest(Location(spec.output.dir) / name, search_digest(loaded, samples))
        resume.parent_run_id = tracker.start_search(
            spec.name, f"tune {loaded.pipeline_path.stem}",
            {"space": space.model_dump(mode="json", exclude={"set"}), "pipeline": str(loaded.pipeline_path),
             "num_samples": samples, **{f"set.{k}": v for k, v in flatten_set(space.set).items()},
             "metric": prepared.metrics},  # metric.<domain>: the score each column's matrix reads
            {"space.yaml": loaded.text, "pipeline.yaml": yaml.safe_dump(loaded.pipeline_data, sort_keys=False)},
            str(resume.folder))
    else:
        resume.attempt += 1
        resume.take_over()
        tracker.reopen(resume.parent_run_id, resume.attempt)
    resume.save()
    board.say(f"[hft-ray] MLflow parent run {resume.parent_run_id} in experiment {spec.experiment!r} "
              f"({tracker.tracking_uri})")
    services = Services.start({n: list(d.eval[: spec.eval.max_examples]) for n, d in prepared.domains.items()},
                              EvalSettings.of(prepared), space.max_concurrent)
    try:
        result = _search(loaded, prepared, tracker, board, capacity, resume, services, samples)
    except BaseException as error:
        tracker.fail(resume.parent_run_id, str(error) or type(error).__name__)
        raise
    finally:
        services.close()
    tracker.finish(resume.parent_run_id)
    return result


def _bases(prepared: Prepared, manifest: Manifest, services: Services, board: Board, have: Capacity,
           max_concurrent: int) -> dict[str, tuple[str, dict]]:
    """Every base checkpoint and its row (one, or one per seed), made once before the trials, as
    `hft-ray run` makes them (and kept in the manifest for a resume): {key: (checkpoint, row)}."""
    spec = prepared.spec
    runner = RayRunner(services, f"{manifest.folder.name}-base", str(manifest.folder / "ray"), Scaling.of(spec.train))
    layout = Layout(spec, prepared.domains, manifest.folder)
    bases = make_bases(spec, layout, manifest, runner, board, have,
                       lambda what: f"{what}-{manifest.folder.name}-a{manifest.attempt}", max_concurrent)
    for key, base in bases.items():
        board.say(f"[hft-ray] base{' ' + key if key else ''}: " + "  ".join(
            f"{d}={s[prepared.metrics[d]]:.2f}" for d, s in base.row.items()))
    return {key: (base.checkpoint, base.row) for key, base in bases.items()}


def _search(loaded: LoadedSpace, prepared: Prepared, tracker: SearchTracker, board: Board, have: Capacity,
            manifest: Manifest, services: Services, samples: int) -> TuneResult:
    spec, space = prepared.spec, loaded.space
    bases = _bases(prepared, manifest, services, board, have, space.max_concurrent)
    context = TrialContext(_with_steps(loaded.pipeline_data, spec), prepared.domains, bases, services,
                           str(manifest.folder), space.objective, prepared.metrics)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": TRIAL_CPUS})
    path = manifest.folder / "tune"
    storage, filesystem = manifest.folder.for_ray()  # Tune's storage: the search's folder or prefix
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # see below
    if manifest.attempt:
        tuner = tune.Tuner.restore(path.for_ray()[0], trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(space.space), storage_filesystem=filesystem)
    else:
        logger = TrialLogger(tracker.tracking_uri, spec.experiment, manifest.parent_run_id, len(spec.stages), SEARCHED)
        # Keeping one checkpoint per trial makes Tune snapshot the search at every report, so a
        # resumed search goes on from each trial's last stage (not from its last timed snapshot).
        tuner = tune.Tuner(trainable, param_space=param_space(space.space), tune_config=_tune_config(loaded, samples),
                           run_config=tune.RunConfig(name=path.name, storage_path=storage,
                                                     storage_filesystem=filesystem, verbose=0,
                                                     callbacks=[logger],
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    seeds = f", each over seeds {', '.join(map(str, spec.seeds))}" if spec.seeds and len(spec.seeds) > 1 else ""
    board.say(f"[hft-ray] tune: {space.space.model_dump(exclude_none=True)} x {samples} sample(s){seeds}, "
              f"{space.max_concurrent} at a time, scheduler {space.scheduler.kind}, objective "
              f"{space.objective.metric} ({space.objective.direction})")
    with _trial_lines_to(board):
        grid = tuner.fit()
    return search_results(loaded, tracker, manifest, grid)


def _tune_config(loaded: LoadedSpace, samples: int) -> tune.TuneConfig:
    space, total = loaded.space, len(loaded.spec.stages)
    scheduler = None
    if space.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time_attr counts reports, i.e. stages; max_t = the pipeline's stages.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=total,
                                  grace_period=min(space.scheduler.grace_period, total),
                                  reduction_factor=space.scheduler.reduction_factor)
    return tune.TuneConfig(metric="objective", mode=space.objective.direction, num_samples=samples,
                           scheduler=scheduler, max_concurrent_trials=space.max_concurrent)


def _with_steps(pipeline_data: dict, spec) -> dict:
    """The searched pipeline with the steps the preflight derived for stages given in epochs, so
    a trial (which parses the file's data again) trains the steps `hft-ray run` would."""
    data = json.loads(json.dumps(pipeline_data))
    for raw, stage in zip(data.get("stages", []), spec.stages, strict=True):
        if raw.pop("epochs", None) is not None:
            raw["steps"] = stage.steps
    return data
