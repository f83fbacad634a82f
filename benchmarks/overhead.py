"""Orchestration overhead: `hft-ray run PIPELINE` against the same training and evaluation done
in one plain Python process (no Ray, no MLflow), one branch after another. Both are timed the
same way, as a command from start to exit (imports, reading the pipeline and its data included),
side by side in one run: plain, pipeline, then again in the other order.

    python benchmarks/overhead.py pipelines/quickstart.yaml [--threads N] [--rounds R]

Writes benchmarks/out/overhead.json and prints the ratio (target <= 1.25 on the quickstart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def plain_process(path: str, threads: int) -> dict:
    """Pretrain, then every method's stages in order, evaluating every domain after each: the
    planner's jobs and the stage function the workers run, in this process."""
    import torch

    from hft_ray.config.preflight import prepare
    from hft_ray.config.spec import load_spec
    from hft_ray.run.planner import Planner
    from hft_ray.train.channel import LocalChannel
    from hft_ray.train.evaluation import evaluate
    from hft_ray.train.models import load_model, load_tokenizer
    from hft_ray.train.runtime import Runtime
    from hft_ray.train.stage import fit_stage

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as the product's workers do
    spec, _ = load_spec(path)
    with tempfile.TemporaryDirectory() as folder:
        prepared = prepare(spec.model_copy(update={"output": spec.output.model_copy(update={"dir": folder})}),
                           Path(path).parent)
        spec, tokenizer = prepared.spec, load_tokenizer(spec.model.source)
        planner, runtime = Planner(spec, prepared.domains, folder), Runtime(0, 1, torch.device("cpu"))
        channel = LocalChannel(Path(folder) / "channel", on_event=lambda event: None)
        evals = {n: list(d.eval[: spec.eval.max_examples]) for n, d in prepared.domains.items()}

        def evaluate_all(model):
            return {n: evaluate(model, tokenizer, ex, max_new_tokens=spec.eval.max_new_tokens,
                                batch_size=spec.eval.batch_size)[prepared.metrics[n]] for n, ex in evals.items()}

        base = load_model(spec.model.source, seed=spec.seed)
        if spec.pretrain:
            job = planner.pretrain("", threads)
            base = fit_stage(base, tokenizer, job, job.stages[0], runtime, channel)[0]
        rows = {"base": evaluate_all(base)}
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for method in spec.methods:
            base.load_state_dict(state)
            job = planner.branch(method, 1, "")
            model = base
            for stage in job.stages:
                model = fit_stage(model, tokenizer, job, stage, runtime, channel)[0]
                rows[f"{method}/{stage.index}"] = evaluate_all(model)
    return rows


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the plain process")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs, alternating which goes first")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # the plain process itself
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_process(args.pipeline, args.threads)))
        return
    plain_cmd = [sys.executable, __file__, args.pipeline, "--plain", "--threads", str(args.threads)]
    runs = {"plain": [], "pipeline": []}
    for round_ in range(args.rounds):
        for which in (("plain", "pipeline") if round_ % 2 == 0 else ("pipeline", "plain")):
            with tempfile.TemporaryDirectory() as folder:
                command = plain_cmd if which == "plain" else [
                    "hft-ray", "run", args.pipeline, "--json", "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
                    "--set", f"output.dir={folder}/runs"]
                wall, out = timed(command)
            runs[which].append({"wall_s": wall, "out": json.loads(out)})
            print(f"{which:8s} {wall:6.1f} s", flush=True)
    plain = statistics.median(r["wall_s"] for r in runs["plain"])
    pipeline = statistics.median(r["wall_s"] for r in runs["pipeline"])
    print(f"ratio (pipeline / plain, medians): {pipeline / plain:.2f}  (target <= 1.25)")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(
        {"pipeline": args.pipeline, "cpus": os.cpu_count(), "threads": args.threads, "plain_s": plain,
         "pipeline_s": pipeline, "ratio": pipeline / plain, "runs": runs}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
