"""Orchestration overhead: `hft-ray run PIPELINE` wall time against the same training and
evaluation done in one plain Python process (no Ray, no MLflow), one branch after another.

    python benchmarks/overhead.py pipelines/quickstart.yaml [--threads N]

Writes benchmarks/out/overhead.json and prints the ratio (target <= 1.25 on the quickstart).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hft_ray.evaluation import evaluate
from hft_ray.models import load_model, load_tokenizer
from hft_ray.preflight import prepare
from hft_ray.data import encode, mix_balanced
from hft_ray.selection import select
from hft_ray.spec import HFTMethod, load_spec
from hft_ray.training import train


def plain_process(path: str) -> dict:
    """Pretrain, then every method's stages in order, evaluating every domain after each."""
    spec, _ = load_spec(path)
    prepared = prepare(spec, Path(path).parent)
    started = time.perf_counter()
    tokenizer = load_tokenizer(spec.model.source)
    encoded = {n: encode(list(d.train), tokenizer, spec.train.max_length, domain=n) for n, d in prepared.domains.items()}
    evals = {n: list(d.eval[: spec.eval.max_examples]) for n, d in prepared.domains.items()}

    def evaluate_all(model):
        return {n: evaluate(model, tokenizer, ex, max_new_tokens=spec.eval.max_new_tokens,
                            batch_size=spec.eval.batch_size)[spec.eval.metric] for n, ex in evals.items()}

    base = load_model(spec.model.source, seed=spec.seed)
    if spec.pretrain:
        mixed = mix_balanced([prepared.domains[n].train for n in spec.pretrain.domains])
        train(base, encode(mixed, tokenizer, spec.train.max_length), steps=spec.pretrain.steps, lr=spec.pretrain.lr,
              batch_size=spec.train.batch_size, seed=spec.seed)
    rows = {"base": evaluate_all(base)}
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for method, config in spec.methods.items():
        base.load_state_dict(state)
        for index, stage in enumerate(spec.stages, start=1):
            plan = select(base, config.granularity, config.ratio, spec.seed, index) if isinstance(config, HFTMethod) else None
            train(base, encoded[stage.domain], steps=stage.steps, lr=spec.stage_lr(stage),
                  batch_size=spec.train.batch_size, plan=plan, weight_decay=spec.train.weight_decay,
                  seed=spec.seed * 1000 + index)
            rows[f"{method}/{index}"] = evaluate_all(base)
    return {"wall_s": time.perf_counter() - started, "rows": rows}


def pipeline_run(path: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = subprocess.run(
            ["hft-ray", "run", path, "--json", "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
             "--set", f"output.dir={folder}/runs"], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
    return {"wall_s": wall, "result": json.loads(result.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the plain process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = plain_process(args.pipeline)
    print(f"plain process: {plain['wall_s']:.1f} s", flush=True)
    ray_run = pipeline_run(args.pipeline)
    print(f"hft-ray run:   {ray_run['wall_s']:.1f} s", flush=True)
    ratio = ray_run["wall_s"] / plain["wall_s"]
    print(f"ratio (pipeline / plain): {ratio:.2f}  (target <= 1.25)")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(
        {"pipeline": args.pipeline, "cpus": os.cpu_count(), "threads": args.threads, "plain_s": plain["wall_s"],
         "pipeline_s": ray_run["wall_s"], "ratio": ratio, "plain_rows": plain["rows"],
         "pipeline_result": ray_run["result"]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
