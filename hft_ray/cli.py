"""The `hft-ray` command line. Exit codes: 0 done, 1 failure at run time, 2 bad input."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from hft_ray.errors import UserError
from hft_ray.selection import GRANULARITIES


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a ratio in (0, 1) such as 0.5") from None


@contextlib.contextmanager
def _progress_to_stderr(json_output: bool):
    """With --json, Ray's forwarded worker output and our progress go to stderr, so stdout
    holds the JSON alone. Ray is shut down before stdout comes back: its log monitor forwards
    lines that arrive late (a trial's last words) for as long as it runs."""
    if not json_output:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        try:
            yield
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Where to run and where to record: shared by `run` and `tune`."""
    parser.add_argument("--address", help="Ray cluster address (default: an embedded Ray on this machine)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--storage-path", metavar="PATH",
                        help="where checkpoints go (sets output.dir); on a cluster, a path every node reaches")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")


def _storage_override(args: argparse.Namespace, prefix: str = "") -> list[str]:
    """--storage-path as the --set it stands for."""
    if args.storage_path is None:
        return []
    return [f"{prefix}output.dir={json.dumps(args.storage_path)}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hft-ray", description="Half Fine-Tuning of LLMs with Ray and MLflow.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    select = commands.add_parser("select", help="print the selection plan (which half is trained) for a model")
    select.add_argument("model", metavar="MODEL",
                        help="builtin:tiny-llama (and other built-ins), builtin:smollm2-135m, a model folder, "
                             "a .gguf file, or a cached Hugging Face id")
    select.add_argument("--granularity", default="category", help=f"one of {', '.join(GRANULARITIES)} (default: category)")
    select.add_argument("--ratio", type=_ratio, default=0.5, help="fraction trained, in (0, 1) (default: 0.5)")
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--stage", type=int, default=0, help="stage index: every stage draws a new plan")
    select.add_argument("--select-embeddings", action="store_true",
                        help="put embeddings, lm_head and the final norm under selection (default: trained)")
    select.add_argument("--json", action="store_true", help="print the plan as JSON")
    select.set_defaults(handler=run_select)

    run = commands.add_parser("run", help="run a pipeline: stages per method, forgetting matrices in MLflow")
    run.add_argument("pipeline", metavar="PIPELINE.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a key of the pipeline file, e.g. --set train.lr=3e-4 (repeatable)")
    run.add_argument("--resume", nargs="?", const="latest", metavar="RUN_ID",
                     help="continue the newest unfinished run of this pipeline (or RUN_ID) after its driver died: "
                          "finished stages are skipped, their MLflow runs reused")
    _add_run_options(run)
    run.set_defaults(handler=run_pipeline)

    tune = commands.add_parser("tune", help="Ray Tune search over the selection (granularity, ratio, ...)")
    tune.add_argument("space", metavar="SPACE.yaml", help="a search space file, e.g. tune_spaces/selection.yaml")
    tune.add_argument("--num-samples", type=int, help="repeat the grid N times (default: num_samples of the file)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="override a key of the space file, e.g. --set set.output.dir=/tmp/runs (repeatable)")
    _add_run_options(tune)
    tune.set_defaults(handler=run_tune)

    submit = commands.add_parser("submit", help="run a pipeline or a tune space on a Ray cluster (a Ray Job)")
    submit.add_argument("file", metavar="PIPELINE.yaml|SPACE.yaml")
    submit.add_argument("--address", required=True,
                        help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (the Ray token is sent if one is "
                             "set: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    submit.add_argument("--wait", action="store_true", help="stream the job's logs; exit with the job's exit code")
    submit.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a key of the file (repeatable)")
    submit.add_argument("--tracking-uri", help="MLflow store the job writes to; on a multi-node cluster an http "
                                               "server (default: $MLFLOW_TRACKING_URI or ./mlflow.db, made absolute)")
    submit.add_argument("--storage-path", metavar="PATH",
                        help="checkpoints on the cluster (default: output.dir, made absolute on this machine)")
    submit.add_argument("--num-samples", type=int, help="for a tune space: repeat the grid N times")
    submit.set_defaults(handler=run_submit)

    ui = commands.add_parser("ui", help="the MLflow UI over the project's store, on 127.0.0.1")
    ui.add_argument("--tracking-uri", help="the store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    ui.add_argument("--port", type=int, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1", help="the interface to bind (default: 127.0.0.1, this machine only)")
    ui.set_defaults(handler=run_ui)

    report = commands.add_parser("report", help="print the matrices and summary of a pipeline run from MLflow")
    report.add_argument("run_id", nargs="?", metavar="RUN_ID", help="default: the latest pipeline run")
    report.add_argument("--tracking-uri")
    report.add_argument("--json", action="store_true")
    report.set_defaults(handler=run_report)
    return parser


def run_select(args: argparse.Namespace) -> int:
    from hft_ray.models import meta_model
    from hft_ray.selection import plan_units, model_units, validate_selection_args

    problems = validate_selection_args(args.granularity, args.ratio)
    try:
        model = meta_model(args.model)
    except UserError as error:
        problems += error.problems
    if problems:
        raise UserError(*problems)
    plan = plan_units(model_units(model), model.config.model_type, args.granularity, args.ratio,
                      args.seed, args.stage, args.select_embeddings)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        from hft_ray.display import format_plan

        print(format_plan(plan, title=args.model))
    return 0


def run_pipeline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hft_ray.preflight import prepare
    from hft_ray.spec import load_spec
    from hft_ray.tracking import Tracker, resolve_tracking_uri

    spec, text = load_spec(args.pipeline, args.set + _storage_override(args))
    prepared = prepare(spec, Path(args.pipeline).parent)  # every input problem, before anything starts

    from hft_ray.display import format_matrix
    from hft_ray.pipeline import PipelineFailure, PipelineRun, init_ray, resumable

    try:
        with _progress_to_stderr(args.json):
            tracker = Tracker(resolve_tracking_uri(args.tracking_uri), spec.experiment)
            resume = resumable(tracker, prepared.spec, None if args.resume == "latest" else args.resume) \
                if args.resume else None
            init_ray(args.address)
            result = PipelineRun(prepared, text, tracker, lambda line: print(line, flush=True), resume).run()
    except PipelineFailure as error:
        print(f"hft-ray: run failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    for method, matrix in result.matrices.items():
        print()
        print(format_matrix(matrix, f"{method} ({spec.eval.metric}; * = trained in that stage)", result.summaries[method]))
    print(f"\nMLflow parent run {result.parent_run_id} in experiment {spec.experiment!r} "
          f"({tracker.tracking_uri}); checkpoints in {result.output_dir}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from hft_ray.preflight import prepare
    from hft_ray.tracking import Tracker, resolve_tracking_uri
    from hft_ray.tuning import load_space

    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples: {args.num_samples} is not a positive number of samples")
    loaded = load_space(args.space, args.set + _storage_override(args, "set."))
    prepared = prepare(loaded.spec, loaded.pipeline_path.parent)  # every input problem, before anything starts

    from hft_ray.pipeline import init_ray
    from hft_ray.tuning import run_search

    try:
        with _progress_to_stderr(args.json):
            tracker = Tracker(resolve_tracking_uri(args.tracking_uri), loaded.spec.experiment)
            init_ray(args.address)
            result = run_search(loaded, prepared, tracker, args.num_samples, lambda line: print(line, flush=True))
    except Exception as error:
        print(f"hft-ray: tune failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    if result.best is None:
        print(f"no trial finished every stage; see MLflow parent run {result.parent_run_id}")
        return 1
    print(f"\nbest: {json.dumps({k: v for k, v in result.best.items() if v != '' and k != 'run_id'})}")
    print(f"best pipeline file: {result.best_pipeline}  (hft-ray run {result.best_pipeline})")
    print(f"MLflow parent run {result.parent_run_id} in experiment {loaded.spec.experiment!r} ({tracker.tracking_uri})")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from hft_ray.spec import read_yaml
    from hft_ray.submit import submit
    from hft_ray.tracking import resolve_tracking_uri

    data, _ = read_yaml(args.file, "pipeline or space")
    kind = "tune" if isinstance(data, dict) and "space" in data and "pipeline" in data else "run"
    if args.num_samples is not None and (kind != "tune" or args.num_samples < 1):
        raise UserError(f"--num-samples {args.num_samples}: takes a positive number, for a tune space only")
    extra = ["--num-samples", str(args.num_samples)] if args.num_samples else []
    return submit(kind, args.file, args.address, overrides=args.set, tracking_uri=resolve_tracking_uri(args.tracking_uri),
                  storage_path=args.storage_path, extra_args=extra, wait=args.wait)


def run_ui(args: argparse.Namespace) -> int:
    from hft_ray.tracking import resolve_tracking_uri
    from hft_ray.ui import serve

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: give a port in 1..65535")
    return serve(resolve_tracking_uri(args.tracking_uri), args.host, args.port)


def run_report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from hft_ray.display import format_matrix
    from hft_ray.metrics import ForgettingMatrix
    from hft_ray.tracking import latest_pipeline_run, load_artifact_json, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    try:
        run = latest_pipeline_run(client, args.run_id)
    except Exception as error:  # mlflow raises its own exception for an unknown id
        raise UserError(f"RUN_ID: no run {args.run_id!r} in {uri} ({str(error).splitlines()[0]})") from None
    if run is None:
        raise UserError(f"no pipeline run in {uri}; run one with: hft-ray run pipelines/quickstart.yaml")
    methods = sorted(a.path.removeprefix("forgetting/").removesuffix(".json")
                     for a in client.list_artifacts(run.info.run_id, "forgetting")
                     if a.path.endswith(".json") and a.path.count(".") == 1)
    report = {"run_id": run.info.run_id, "status": run.info.status, "methods": {}}
    for method in methods:
        matrix = ForgettingMatrix.from_dict(load_artifact_json(client, run.info.run_id, f"forgetting/{method}.json"))
        metrics = {k.split(".", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith(f"{method}.")}
        report["methods"][method] = {"matrix": matrix.to_dict(), "summary": metrics}
        if not args.json:
            print(format_matrix(matrix, f"{method}:", metrics), end="\n\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"run {run.info.run_id} ({run.info.status}), pipeline {run.data.tags.get('hft.pipeline')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        print("hft-ray: error:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
