"""What each `hft-ray` command does, once its arguments are parsed (hft_ray/cli/main.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from hft_ray.errors import UserError


def run_select(args: argparse.Namespace) -> int:
    from hft_ray.core.selection import model_units, plan_units, validate_selection_args
    from hft_ray.train.models import meta_model

    problems = validate_selection_args(args.granularity, args.ratio)
    try:
        model = meta_model(args.model)
    except UserError as error:
        problems += error.problems
    if problems:
        raise UserError(*problems)
    plan = plan_units(model_units(model), model.config.model_type, args.granularity, args.ratio,
                      args.seed, args.stage, args.select_embeddings)
    memory = _memory(args, model, plan) if args.memory else None
    if args.json:
        print(json.dumps({**plan.to_dict(), **({"memory_gib": memory} if memory else {})}))
        return 0
    from hft_ray.cli.display import format_memory, format_plan

    print(format_plan(plan, title=args.model))
    if memory:
        print()
        print(format_memory(memory, f"memory per worker, GiB ({args.precision}, {args.strategy} x{args.workers}, "
                                    f"batch {args.batch_size} x {args.max_length} tokens"
                                    f"{', gradient checkpointing' if args.gradient_checkpointing else ''})"))
    return 0


def _memory(args: argparse.Namespace, model, plan) -> dict[str, dict[str, str]]:
    """{"fft": estimate, "<granularity> <ratio>": estimate} in GiB (hft_ray/core/memory.py)."""
    from hft_ray.core.memory import Setup, Shapes, estimate, trained_params

    if args.workers < 1 or args.batch_size < 1 or args.max_length < 1:
        raise UserError("--workers, --batch-size and --max-length take positive numbers")
    setup = Setup(args.precision, args.strategy, args.workers, args.batch_size, args.max_length,
                  args.gradient_checkpointing, kahan=True)  # as a pipeline trains bf16 by default
    shapes = Shapes.of(model)
    return {"fft": estimate(shapes, trained_params(model, None), setup).gib(),
            f"hft {args.granularity} {args.ratio:g}": estimate(shapes, trained_params(model, plan.param_masks()),
                                                                setup).gib()}


@contextlib.contextmanager
def _progress_board(json_output: bool):
    """What the user sees while a run goes (hft_ray/run/progress.py). With --json it goes to
    stderr, so stdout holds the JSON alone; Ray is shut down before stdout comes back, since its
    log monitor forwards late lines (a trial's last words) for as long as it runs."""
    from hft_ray.run.progress import Board

    redirect = contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext()
    with redirect:
        board = Board()
        try:
            yield board
        finally:
            board.close()
            if json_output:
                import ray

                if ray.is_initialized():
                    ray.shutdown()


def _say_rows(prepared) -> None:
    """The defaults chosen for a pretrained model (and rates too high for one), then one line per
    domain whose rows were cut or dropped to fit train.max_length (none is lost unsaid)."""
    for note in prepared.spec.notes:
        print(f"[hft-ray] {note}", file=sys.stderr)
    for name, report in prepared.rows.items():
        if report.tokens:
            print(f"[hft-ray] {report.tokens_line(name)}", file=sys.stderr)
        if report.truncated or report.dropped:
            print(f"[hft-ray] {report.line(name, prepared.spec.train.max_length)}", file=sys.stderr)
    for line in prepared.steps_from_epochs:
        print(f"[hft-ray] {line}", file=sys.stderr)


def _storage_override(args: argparse.Namespace, prefix: str = "") -> list[str]:
    """--storage-path as the --set it stands for."""
    return [] if args.storage_path is None else [f"{prefix}output.dir={json.dumps(args.storage_path)}"]


def _fits_here(args: argparse.Namespace, spec) -> None:
    """On an embedded Ray (no --address): `_fits` against this machine."""
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        from hft_ray.run.cluster import embedded_capacity

        _fits(spec, embedded_capacity())


def _fits(spec, have) -> None:
    """Exit 2, before anything starts, when a branch's worker group (or an evaluator) can never
    fit the cluster."""
    from hft_ray.run.cluster import fit_problems

    problems = fit_problems(spec.train, spec.eval.resources, have)
    if problems:
        raise UserError(*problems)


def _start_ray(args: argparse.Namespace, spec, trials_stop_early: bool = False):
    """Ray, joined or embedded; exit 2 if a branch can never fit it; returns its capacity."""
    from hft_ray.run.cluster import capacity, init_ray

    init_ray(args.address, args.verbose, trials_stop_early)
    have = capacity(args.address)
    _fits(spec, have)
    _fits_cluster_gpus(spec, have)
    return have


def _fits_cluster_gpus(spec, have) -> None:
    """The memory preflight against the cluster's GPUs, where it could not know them before Ray
    started (use_gpu, no train.memory_gb, no GPU where the driver runs): exit 2 if a branch cannot
    fit even the largest memory the cluster's GPU type comes with."""
    from hft_ray.config.memory_check import check_memory, cluster_gpu_memory, worker_memory

    if not spec.train.use_gpu or worker_memory(spec) is not None:
        return
    known = cluster_gpu_memory(have.accelerators)
    if known is None:
        print(f"[hft-ray] memory preflight not run: {have.where} names no known GPU type; set train.memory_gb "
              "to the workers' GPU memory to have it checked", file=sys.stderr)
        return
    from hft_ray.train.models import meta_model

    problems = check_memory(spec, meta_model(spec.model.source, spec.model.trust_remote_code), known)
    if problems:
        raise UserError(*problems)


def run_pipeline(args: argparse.Namespace) -> int:
    from hft_ray.config.preflight import prepare
    from hft_ray.config.spec import load_spec

    seeds = [f"seeds={json.dumps(args.seeds)}"] if args.seeds else []
    spec, text = load_spec(args.pipeline, args.set + seeds + _storage_override(args))
    _fits_here(args, spec)  # before the preflight writes token folders
    prepared = prepare(spec, Path(args.pipeline).parent)  # every input problem, before anything starts
    _say_rows(prepared)

    from hft_ray.cli.display import format_result
    from hft_ray.core.scores import describe
    from hft_ray.run.manifest import resumable
    from hft_ray.run.pipeline import PipelineRun
    from hft_ray.run.runner import RunFailure
    from hft_ray.run.tracking import Tracker, resolve_tracking_uri

    try:
        with _progress_board(args.json) as board:
            tracker = Tracker(resolve_tracking_uri(args.tracking_uri), spec.experiment)
            resume = resumable(tracker, prepared.spec, None if args.resume == "latest" else args.resume) \
                if args.resume else None
            have = _start_ray(args, spec)
            result = PipelineRun(prepared, text, tracker, board, have, resume).run()
    except RunFailure as error:
        print(f"hft-ray: run failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print()
    print(format_result(result, describe(prepared.metrics)))
    print(f"\nMLflow parent run {result.parent_run_id} in experiment {spec.experiment!r} "
          f"({tracker.tracking_uri}); checkpoints in {result.output_dir}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from hft_ray.config.preflight import prepare
    from hft_ray.config.space import load_space

    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples: {args.num_samples} is not a positive number of samples")
    loaded = load_space(args.space, args.set + _storage_override(args, "set."))
    _fits_here(args, loaded.spec)  # before the preflight writes token folders
    prepared = prepare(loaded.spec, loaded.pipeline_path.parent)  # every input problem, before anything starts
    _say_rows(prepared)

    from hft_ray.run.runner import RunFailure
    from hft_ray.run.tracking import SearchTracker, resolve_tracking_uri
    from hft_ray.run.tuning import resumable_search, run_search

    try:
        with _progress_board(args.json) as board:
            tracker = SearchTracker(resolve_tracking_uri(args.tracking_uri), loaded.spec.experiment)
            resume = resumable_search(tracker, loaded, None if args.resume == "latest" else args.resume,
                                      args.num_samples) if args.resume else None
            have = _start_ray(args, loaded.spec, trials_stop_early=True)
            result = run_search(loaded, prepared, tracker, board, have, args.num_samples, resume)
    except RunFailure as error:
        print(f"hft-ray: tune failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    if result.best is None:
        print(f"no trial finished every stage; see MLflow parent run {result.parent_run_id}")
        return 1
    print(f"\nbest: {json.dumps({k: v for k, v in result.best.items() if v != '' and k not in ('run_id', 'matrix')})}")
    how = ("also the parent run's artifact best_pipeline.yaml" if "://" in result.best_pipeline
           else f"hft-ray run {result.best_pipeline}")
    print(f"best pipeline file: {result.best_pipeline}  ({how})")
    print(f"MLflow parent run {result.parent_run_id} in experiment {loaded.spec.experiment!r} ({tracker.tracking_uri})")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from hft_ray.cli.submit import submit
    from hft_ray.config.files import read_yaml
    from hft_ray.run.tracking import resolve_tracking_uri

    data, _ = read_yaml(args.file, "pipeline or space")
    kind = "tune" if isinstance(data, dict) and "space" in data and "pipeline" in data else "run"
    if args.num_samples is not None and (kind != "tune" or args.num_samples < 1):
        raise UserError(f"--num-samples {args.num_samples}: takes a positive number, for a tune space only")
    extra = ["--num-samples", str(args.num_samples)] if args.num_samples else []
    return submit(kind, args.file, args.address, overrides=args.set,
                  tracking_uri=resolve_tracking_uri(args.tracking_uri), storage_path=args.storage_path,
                  extra_args=extra, wait=args.wait)


def run_ui(args: argparse.Namespace) -> int:
    from hft_ray.cli.ui import serve
    from hft_ray.run.tracking import resolve_tracking_uri

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: give a port in 1..65535")
    return serve(resolve_tracking_uri(args.tracking_uri), args.host, args.port, args.artifacts_destination)


def run_report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from hft_ray.cli.display import format_matrix, format_result
    from hft_ray.core.metrics import ForgettingMatrix
    from hft_ray.core.scores import describe
    from hft_ray.run.results import RESULT_FILE, result_from_json
    from hft_ray.run.tracking import latest_pipeline_run, load_artifact_json, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    try:
        run = latest_pipeline_run(client, args.run_id)
    except Exception as error:  # mlflow raises its own exception for an unknown id
        raise UserError(f"RUN_ID: no run {args.run_id!r} in {uri} ({str(error).splitlines()[0]})") from None
    if run is None:
        raise UserError(f"no pipeline run in {uri}; run one with: hft-ray run pipelines/quickstart.yaml")
    run_id = run.info.run_id
    read = {k.removeprefix("metric."): v for k, v in run.data.params.items() if k.startswith("metric.")}
    read = describe(read) if read else "scores"
    if any(a.path == RESULT_FILE for a in client.list_artifacts(run_id)):  # a finished run: what `run` printed
        result = load_artifact_json(client, run_id, RESULT_FILE)
        report = {"run_id": run_id, "status": run.info.status, **{k: v for k, v in result.items()
                                                                  if k not in ("parent_run_id", "output_dir")}}
        if not args.json:
            print(format_result(result_from_json(result), read), end="\n\n")
    else:  # an unfinished run: the matrices logged so far
        methods = sorted(a.path.removeprefix("forgetting/").removesuffix(".json")
                         for a in client.list_artifacts(run_id, "forgetting")
                         if a.path.endswith(".json") and a.path.count(".") == 1)
        report = {"run_id": run_id, "status": run.info.status, "methods": {}}
        for method in methods:
            matrix = ForgettingMatrix.from_dict(load_artifact_json(client, run_id, f"forgetting/{method}.json"))
            metrics = {k.split(".", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith(f"{method}.")}
            report["methods"][method] = {"matrix": matrix.to_dict(), "summary": metrics}
            if not args.json:
                print(format_matrix(matrix, f"{method} ({read}):", metrics), end="\n\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"run {run_id} ({run.info.status}), pipeline {run.data.tags.get('hft.pipeline')}")
    return 0
