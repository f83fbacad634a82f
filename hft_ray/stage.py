"""One stage = one Ray Train `TorchTrainer` run: N workers start from the previous stage's
checkpoint, apply the stage's selection plan, train, and write one checkpoint.

`stage_worker` is the function every worker runs; the Ray-specific lines are marked `# Ray`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hft_ray.checkpoints import load_checkpoint, read_json, save_into
from hft_ray.data import Example, encode
from hft_ray.freezing import apply_plan
from hft_ray.selection import SelectionPlan
from hft_ray.training import batches, make_optimizer, run_steps


@dataclass(frozen=True)
class StageJob:
    """Everything a stage needs; travels to the workers as `train_loop_config`."""

    label: str                 # e.g. "hft stage 2/3 (add)", for progress lines
    init_checkpoint: str       # the previous stage's checkpoint (or the base model)
    examples: tuple[Example, ...]
    steps: int
    lr: float
    batch_size: int
    max_length: int
    weight_decay: float
    seed: int
    log_every: int
    plan: dict | None          # SelectionPlan.to_dict(), None for full fine-tuning


@dataclass(frozen=True)
class StageResult:
    checkpoint: str
    losses: list[float]
    train_s: float
    step_s: float              # median seconds per optimizer step
    trainable: int             # parameters the optimizer updates (entries, for masks)
    total: int


def stage_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train  # Ray
    import ray.train.torch  # Ray

    job: StageJob = config["job"]
    context = ray.train.get_context()  # Ray
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(job.seed)
    # One intra-op thread per CPU this worker holds (at least one): a 1-CPU worker spinning two
    # OpenMP threads beside another worker slows both down.
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    model, tokenizer = load_checkpoint(job.init_checkpoint)
    # Freeze before prepare_model: DDP fixes the parameters it synchronises when it wraps.
    applied = apply_plan(model, SelectionPlan.from_dict(job.plan)) if job.plan else None
    counts = applied.counts() if applied else {"total": sum(p.numel() for p in model.parameters())}
    counts.setdefault("trainable", counts["total"])
    model = ray.train.torch.prepare_model(model)  # Ray: device placement, DDP when world > 1
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, job.lr, job.weight_decay, job.steps)
    if applied:
        applied.attach(optimizer)
    encoded = encode(list(job.examples), tokenizer, job.max_length)
    data = ({k: v.to(device) for k, v in batch.items()}
            for batch in batches(encoded, job.batch_size, job.seed, rank, world))
    step_times = []
    last = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        nonlocal last
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
        if rank == 0 and (step % job.log_every == 0 or step == job.steps):
            # Not print(): Ray Train patches it into a logger that echoes each line twice.
            sys.stdout.write(f"[hft-ray] {job.label}: step {step}/{job.steps} loss {loss:.4f}\n")
            sys.stdout.flush()

    started = time.perf_counter()
    losses = run_steps(model, optimizer, scheduler, data, job.steps, on_step=on_step)
    log = {"losses": losses, "train_s": time.perf_counter() - started,
           "step_s": statistics.median(step_times), **counts}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_into(folder, model, tokenizer, {"plan.json": job.plan, "train_log.json": log})
            checkpoint = ray.train.Checkpoint.from_directory(folder)  # Ray
        # Every rank must call report: it is a barrier.
        ray.train.report({"loss": losses[-1]}, checkpoint=checkpoint, checkpoint_dir_name="checkpoint")  # Ray


def run_stage(job: StageJob, storage_path: str, run_name: str, workers: int, cpus_per_worker: float,
              use_gpu: bool) -> StageResult:
    """Fit one TorchTrainer; `run_name` must be unique (reusing one resumes the old run)."""
    from ray.train import RunConfig, ScalingConfig  # Ray
    from ray.train.torch import TorchTrainer  # Ray

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config={"job": job, "cpus_per_worker": cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=str(Path(storage_path).resolve())),
    )
    result = trainer.fit()
    log = read_json(result.checkpoint.path, "train_log.json")
    return StageResult(result.checkpoint.path, log["losses"], log["train_s"], log["step_s"],
                       log["trainable"], log["total"])
