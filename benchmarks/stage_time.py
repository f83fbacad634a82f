"""Stage time through Ray Train: FFT vs HFT at every granularity, on 1 worker and on 2 workers
(DDP over gloo), the way `hft-ray run` trains a stage (`hft_ray.stage.run_stage`).

    python benchmarks/stage_time.py                                   # both models; measured: tiny 5 min, SmolLM2 (4 steps) 8 min
    python benchmarks/stage_time.py --models tiny-llama --steps 10    # ~3 min
    python benchmarks/stage_time.py --gpu --models smollm2-135m       # one worker per GPU

Every configuration gets the whole machine: 1 worker with all CPUs (torch threads = CPUs), or 2
workers with half each. The global batch is the same in both (each of 2 workers takes half), so
a step trains the same examples. Per stage it records the median optimizer-step time (forward,
backward, DDP all-reduce, AdamW), the sum of step times (`train_s`) and the wall time of the whole
TorchTrainer run (worker start, model load, final checkpoint). Writes benchmarks/out/stage_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import flop_ratio  # noqa: E402

from hft_ray.checkpoints import write_checkpoint  # noqa: E402
from hft_ray.domains import BUILTIN_DOMAINS  # noqa: E402
from hft_ray.freezing import apply_plan  # noqa: E402
from hft_ray.models import load_model, load_tokenizer  # noqa: E402
from hft_ray.pipeline import init_ray  # noqa: E402
from hft_ray.selection import GRANULARITIES, select  # noqa: E402
from hft_ray.stage import StageJob, run_stage  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
METHODS = ("fft",) + tuple(f"hft-{g}" for g in GRANULARITIES)
SETTINGS = {"tiny-llama": {"batch_size": 32, "max_length": 64, "steps": 40},
            "smollm2-135m": {"batch_size": 8, "max_length": 64, "steps": 10}}


def plan_for(model: torch.nn.Module, method: str) -> tuple[dict | None, float]:
    """The plan (None for FFT) and its FLOP-model ratio."""
    if method == "fft":
        return None, 1.0
    plan = select(model, method.removeprefix("hft-"), 0.5, seed=0, stage=1)
    applied = apply_plan(model, plan)
    ratio = flop_ratio(model)
    applied.remove()
    return plan.to_dict(), ratio


def bench_model(name: str, workers_list: list[int], steps: int | None, use_gpu: bool, folder: Path) -> list[dict]:
    settings = {**SETTINGS[name], **({"steps": steps} if steps else {})}
    model = load_model(f"builtin:{name}", seed=0)
    base = str(write_checkpoint(folder / f"{name}-base", model, load_tokenizer(f"builtin:{name}")))
    examples = tuple(BUILTIN_DOMAINS["upper"].generate(random.Random(0), 1024))
    cpus = os.cpu_count() or 2
    rows = []
    for workers in workers_list:
        for method in METHODS:
            plan, flops = plan_for(model, method)
            job = StageJob(label=f"{name} {method} x{workers}", init_checkpoint=base, examples=examples,
                           steps=settings["steps"], lr=1e-4, batch_size=settings["batch_size"],
                           max_length=settings["max_length"], weight_decay=0.01, seed=0,
                           log_every=max(1, settings["steps"] // 2), plan=plan)
            started = time.perf_counter()
            result = run_stage(job, str(folder / "ray"), f"{name}-{method}-w{workers}-{time.time_ns()}", workers,
                               cpus_per_worker=1 if use_gpu else cpus / workers, use_gpu=use_gpu)
            wall = time.perf_counter() - started
            rows.append({"model": name, "method": method, "workers": workers, "step_s": result.step_s,
                         "train_s": result.train_s, "wall_s": wall, "trained_fraction": result.trainable / result.total,
                         "flop_ratio": flops, **settings})
            print(f"[stage_time] {name} {method} x{workers}: {result.step_s:.3f} s/step, train {result.train_s:.1f} s, "
                  f"wall {wall:.1f} s", flush=True)
            shutil.rmtree(Path(result.checkpoint).parent, ignore_errors=True)  # a SmolLM2 checkpoint is 0.5 GB
    for row in rows:
        fft = next(r for r in rows if r["method"] == "fft" and r["workers"] == row["workers"])
        row["step_vs_fft"] = row["step_s"] / fft["step_s"]
        row["train_vs_fft"] = row["train_s"] / fft["train_s"]
        one = next((r for r in rows if r["method"] == row["method"] and r["workers"] == 1), None)
        row["step_vs_1_worker"] = row["step_s"] / one["step_s"] if one else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, help="optimizer steps per stage (default: per model)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # see step_time.py: denormals make CPU steps several times slower
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    init_ray(None)
    device = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    with tempfile.TemporaryDirectory(dir=OUT if OUT.exists() else None) as folder:
        rows = [row for name in args.models for row in bench_model(name, args.workers, args.steps, args.gpu, Path(folder))]
    OUT.mkdir(exist_ok=True)
    (OUT / "stage_time.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows},
                                                    indent=1))
    print(f"\n{device}, torch {torch.__version__}")
    print("| model | method | workers | step s | vs FFT | FLOP model | vs 1 worker | train s | stage wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = f"{r['step_vs_1_worker']:.2f}" if r["step_vs_1_worker"] else ""
        print(f"| {r['model']} | {r['method']} | {r['workers']} | {r['step_s']:.3f} | {r['step_vs_fft']:.2f} | "
              f"{r['flop_ratio']:.2f} | {one} | {r['train_s']:.1f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
