"""The `hft-ray` command line. Exit codes: 0 done, 1 failure at run time, 2 bad input."""

from __future__ import annotations

import argparse
import os
import sys

from hft_ray.cli import commands
from hft_ray.cli.notices import driver_log_path, route_setup_notices
from hft_ray.core.selection import GRANULARITIES
from hft_ray.errors import UserError


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a ratio in (0, 1) such as 0.5") from None


def _add_run_options(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """Where to run, where to record, what to show: shared by `run` and `tune`."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a key of the file, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN_ID", help=resume_help)
    parser.add_argument("--address", help="Ray cluster address (default: an embedded Ray on this machine)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--storage-path", metavar="PATH",
                        help="where checkpoints go (sets output.dir); on a cluster, a path every node reaches")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and MLflow's own lines too (workers' output, checkpoint and report "
                             f"notices, set-up notices; without it those go to {driver_log_path()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hft-ray", description="Half Fine-Tuning of LLMs with Ray and MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_select(sub)
    _add_run_and_tune(sub)
    _add_data(sub)
    _add_submit(sub)
    _add_ui_and_report(sub)
    return parser


def _add_select(sub) -> None:
    select = sub.add_parser("select", help="print the selection plan (which half is trained) for a model")
    select.add_argument("model", metavar="MODEL",
                        help="builtin:tiny-llama (and other built-ins), builtin:smollm2-135m, a model folder, "
                             "a .gguf file, or a cached Hugging Face id")
    select.add_argument("--granularity", default="category",
                        help=f"one of {', '.join(GRANULARITIES)} (default: category)")
    select.add_argument("--ratio", type=_ratio, default=0.5, help="fraction trained, in (0, 1) (default: 0.5)")
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--stage", type=int, default=0, help="stage index: every stage draws a new plan")
    select.add_argument("--select-embeddings", action="store_true",
                        help="put embeddings, lm_head and the final norm under selection (default: trained)")
    select.add_argument("--json", action="store_true", help="print the plan as JSON")
    memory = select.add_argument_group("memory", "with --memory: per-worker memory, FFT beside the plan")
    memory.add_argument("--memory", action="store_true", help="estimate the memory a worker needs, FFT and the plan")
    memory.add_argument("--precision", choices=("fp32", "bf16", "bf16-mixed"), default="bf16")
    memory.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    memory.add_argument("--workers", type=int, default=1)
    memory.add_argument("--batch-size", type=int, default=8, help="global batch (default: 8)")
    memory.add_argument("--max-length", type=int, default=1024, help="tokens per example (default: 1024)")
    memory.add_argument("--gradient-checkpointing", action="store_true")
    select.set_defaults(handler=commands.run_select)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None


def _add_run_and_tune(sub) -> None:
    run = sub.add_parser("run", help="run a pipeline: stages per method, forgetting matrices in MLflow")
    run.add_argument("pipeline", metavar="PIPELINE.yaml")
    run.add_argument("--seeds", type=_seed_list, metavar="S,S,...",
                     help="run every method once per seed and compare them over seeds (sets seeds:), e.g. 0,1,2")
    _add_run_options(run, "continue the newest unfinished run of this pipeline (or RUN_ID) after its driver died: "
                          "finished stages are skipped, their MLflow runs reused")
    run.set_defaults(handler=commands.run_pipeline)

    tune = sub.add_parser("tune", help="Ray Tune search over the selection (granularity, ratio, ...)")
    tune.add_argument("space", metavar="SPACE.yaml", help="a search space file, e.g. tune_spaces/selection.yaml")
    tune.add_argument("--num-samples", type=int, help="repeat the grid N times (default: num_samples of the file)")
    _add_run_options(tune, "continue the newest unfinished search of this space's pipeline (or RUN_ID) after its "
                           "driver died: finished trials are kept, their MLflow runs reused")
    tune.set_defaults(handler=commands.run_tune)


def _add_data(sub) -> None:
    from hft_ray.cli.data_view import run_data

    data = sub.add_parser("data", help="what each stage will train on, without training: rows, tokens, lengths, "
                                       "rows cut or dropped, padding, the first rows with their learnt tokens")
    data.add_argument("pipeline", metavar="PIPELINE.yaml")
    data.add_argument("--domain", action="append", default=[], metavar="NAME", help="only this domain (repeatable)")
    data.add_argument("--rows", type=int, default=3, metavar="N", help="show the first N training rows (default 3)")
    data.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="override a key of the file (repeatable)")
    data.add_argument("--json", action="store_true", help="print one JSON object on stdout (a contract)")
    data.set_defaults(handler=run_data)


def _add_submit(sub) -> None:
    submit = sub.add_parser("submit", help="run a pipeline or a tune space on a Ray cluster (a Ray Job)")
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
    submit.set_defaults(handler=commands.run_submit)


def _add_ui_and_report(sub) -> None:
    ui = sub.add_parser("ui", help="the MLflow UI over the project's store, on 127.0.0.1")
    ui.add_argument("--tracking-uri", help="the store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    ui.add_argument("--port", type=int, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1", help="the interface to bind (default: 127.0.0.1, this machine only)")
    ui.add_argument("--artifacts-destination", metavar="URI",
                    help="where runs logged through this server keep their artifacts, e.g. s3://bucket/mlflow beside "
                         "the checkpoints (default: mlartifacts/ beside a sqlite store)")
    ui.set_defaults(handler=commands.run_ui)

    report = sub.add_parser("report", help="print the matrices and summary of a pipeline run from MLflow")
    report.add_argument("run_id", nargs="?", metavar="RUN_ID", help="default: the latest pipeline run")
    report.add_argument("--tracking-uri")
    report.add_argument("--json", action="store_true")
    report.set_defaults(handler=commands.run_report)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    route_setup_notices(getattr(args, "verbose", False))
    try:
        return args.handler(args)
    except UserError as error:
        print("hft-ray: error:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
