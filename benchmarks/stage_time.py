"""Stage step time, FFT vs HFT at every granularity, through Ray Train (the branch runner
`hft-ray run` uses: one TorchTrainer per branch, its stages in the same workers) and in one
plain process (the same train function, `hft_ray.train.branch.train_branch`, without Ray).

    python benchmarks/stage_time.py                                    # tiny LLaMA, 1 and 2 workers
    python benchmarks/stage_time.py --models smollm2-135m --steps 4 --stages 2
    python benchmarks/stage_time.py --gpu --models smollm2-135m        # one worker per GPU

Each (mode, workers, method) is one branch of `--stages` stages of `--steps` steps; a stage's
median optimizer step is one sample, and a configuration's figure is the median over its stages
and `--rounds` rounds. Rounds alternate the order of the methods, so slow drift of the machine
(another job, thermal state) falls on every method alike. Every configuration has the whole
machine: 1 worker with every CPU as threads, or 2 workers with half each (DDP over gloo), the
same global batch. Writes benchmarks/out/stage_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import flop_ratio  # noqa: E402

from hft_ray.core.freezing import apply_plan  # noqa: E402
from hft_ray.core.selection import GRANULARITIES, select  # noqa: E402
from hft_ray.data.batching import part_of  # noqa: E402
from hft_ray.data.domains import BUILTIN_DOMAINS  # noqa: E402
from hft_ray.train.branch import train_branch  # noqa: E402
from hft_ray.train.channel import LocalChannel  # noqa: E402
from hft_ray.train.checkpoints import write_checkpoint  # noqa: E402
from hft_ray.train.events import StageTrained  # noqa: E402
from hft_ray.train.job import BranchJob, StageJob, TrainSettings  # noqa: E402
from hft_ray.train.models import load_model, load_tokenizer  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
METHODS = ("fft",) + tuple(f"hft-{g}" for g in GRANULARITIES)
SETTINGS = {"tiny-llama": {"batch_size": 32, "max_length": 64, "steps": 40},
            "smollm2-135m": {"batch_size": 8, "max_length": 64, "steps": 10}}


def method_config(method: str) -> dict:
    if method == "fft":
        return {"kind": "fft"}
    return {"kind": "hft", "granularity": method.removeprefix("hft-"), "ratio": 0.5, "seed": 0}


def branch(folder: Path, base: str, method: str, stages: int, settings: dict, threads: int) -> BranchJob:
    examples = tuple(BUILTIN_DOMAINS["upper"].generate(random.Random(0), 1024))
    parts = (part_of(examples, load_tokenizer(base), folder / "tokens", max_length=settings["max_length"]),)
    jobs = tuple(StageJob(i, f"{method} stage {i}", parts, settings["steps"], 1e-4, i,
                          str(folder / f"{method}-{time.time_ns()}" / f"stage-{i}"), method_config(method))
                 for i in range(1, stages + 1))
    train = TrainSettings(batch_size=settings["batch_size"], max_length=settings["max_length"], weight_decay=0.01,
                          log_every=settings["steps"])
    return BranchJob(method, base, jobs, train, threads=threads)


def in_process(job: BranchJob, folder: Path) -> list[float]:
    events = []
    train_branch(job, LocalChannel(folder / f"channel-{time.time_ns()}", events.append))
    return [e.step_s for e in events if isinstance(e, StageTrained)]


def through_ray(job: BranchJob, folder: Path, workers: int, use_gpu: bool, services) -> list[float]:
    from hft_ray.run.ray_worker import Scaling
    from hft_ray.run.runner import RayRunner

    cpus = 1 if use_gpu else (os.cpu_count() or 2) / workers
    runner = RayRunner(services, f"bench-{time.time_ns()}", str(folder / "ray"), Scaling(workers, cpus, use_gpu, 0))
    runner.launch(job, f"{job.name}-w{workers}-{time.time_ns()}")
    return [e.step_s for e in runner.events() if isinstance(e, StageTrained)]


def bench(name: str, args, folder: Path, services) -> list[dict]:
    settings = {**SETTINGS[name], **({"steps": args.steps} if args.steps else {})}
    model = load_model(f"builtin:{name}", seed=0)
    base = str(write_checkpoint(folder / f"{name}-base", model, load_tokenizer(f"builtin:{name}")))
    flops = {}
    for method in METHODS:
        applied = apply_plan(model, select(model, method.removeprefix("hft-"), 0.5, 0, 1)) if method != "fft" else None
        flops[method] = flop_ratio(model)
        if applied:
            applied.remove()
    cpus = os.cpu_count() or 2
    samples: dict[tuple, list[float]] = {}
    configs = [("one process", 1)] + [("Ray Train", w) for w in args.workers]
    for round_ in range(args.rounds):
        for mode, workers in configs:
            for method in METHODS if round_ % 2 == 0 else METHODS[::-1]:
                job = branch(folder, base, method, args.stages, settings, max(1, cpus // workers))
                steps = (in_process(job, folder) if mode == "one process"
                         else through_ray(job, folder, workers, args.gpu, services))
                samples.setdefault((mode, workers, method), []).extend(steps)
                print(f"[stage_time] {name} {mode} x{workers} {method}: "
                      f"{', '.join(f'{s * 1000:.0f}' for s in steps)} ms/step", flush=True)
    rows = []
    for (mode, workers, method), steps in samples.items():
        fft = statistics.median(samples[(mode, workers, "fft")])
        rows.append({"model": name, "mode": mode, "workers": workers, "method": method,
                     "step_s": statistics.median(steps), "vs_fft": statistics.median(steps) / fft,
                     "flop_ratio": flops[method], "samples": steps,
                     **settings, "stages": args.stages, "rounds": args.rounds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-llama"], choices=list(SETTINGS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, help="optimizer steps per stage (default: per model)")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hft_ray.run.cluster import init_ray
    from hft_ray.run.runner import EvalSettings, Services

    init_ray(None)
    services = Services.start({}, EvalSettings(1, 1, args.gpu), 0)
    device = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as folder:
        rows = [row for name in args.models for row in bench(name, args, Path(folder), services)]
    (OUT / "stage_time.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows},
                                                    indent=1))
    print(f"\n{device}, torch {torch.__version__}; median step over {args.stages} stages x {args.rounds} rounds")
    print("| model | mode | workers | method | step s | vs FFT | FLOP model |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['workers']} | {r['method']} | {r['step_s']:.4f} | "
              f"{r['vs_fft']:.2f} | {r['flop_ratio']:.2f} |")


if __name__ == "__main__":
    main()
