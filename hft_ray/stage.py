"""One stage = one Ray Train `TorchTrainer` run: N workers start from the previous stage's
checkpoint, apply the stage's selection plan, train, and write one checkpoint.

`stage_worker` is the function every worker runs; the Ray-specific lines are marked `# Ray`.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hft_ray.checkpoints import load_checkpoint, load_optimizer, read_json, save_into, save_optimizer
from hft_ray.data import Example, encode
from hft_ray.dpo import dpo_step_loss, encode_pairs, with_reference
from hft_ray.freezing import PeriodicSelection, apply_plan
from hft_ray.lora import attach_lora, merge_lora
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
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: only the final one)
    kind: str = "sft"          # "dpo": `examples` are Preference pairs, the reference is init_checkpoint
    beta: float = 0.1
    lora: dict | None = None   # {r, alpha, dropout}: train adapters, merge them at the end
    reselect_every: int = 0    # HFT: a new plan every N steps within the stage (one worker)


@dataclass(frozen=True)
class StageResult:
    checkpoint: str
    losses: list[float]
    train_s: float
    step_s: float              # median seconds per optimizer step
    trainable: int             # parameters the optimizer updates (entries, for masks)
    total: int


PROGRESS_FILE = "progress.json"


def stage_worker(config: dict) -> None:
    """Runs on every Ray Train worker. Every `checkpoint_every` steps it reports a checkpoint
    with the optimizer state; a worker group restarted after a failure resumes from it."""
    import ray.train  # Ray
    import ray.train.torch  # Ray

    job: StageJob = config["job"]
    context = ray.train.get_context()  # Ray
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(job.seed)
    # One intra-op thread per CPU this worker holds (at least one): a 1-CPU worker spinning two
    # OpenMP threads beside another worker slows both down.
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    resume = ray.train.get_checkpoint()  # Ray: set when the group restarts after a failure
    with resume.as_directory() if resume else contextlib.nullcontext(job.init_checkpoint) as folder:
        model, tokenizer = load_checkpoint(folder)
        progress = read_json(folder, PROGRESS_FILE) if resume else {"step": 0, "losses": [], "step_times": []}
        # Freeze before prepare_model: DDP fixes the parameters it synchronises when it wraps.
        applied = apply_plan(model, SelectionPlan.from_dict(job.plan)) if job.plan else None
        counts = applied.counts() if applied else {"total": sum(p.numel() for p in model.parameters())}
        counts.setdefault("trainable", counts["total"])
        if job.lora:
            model = attach_lora(model, **job.lora)
            counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model = ray.train.torch.prepare_model(model)  # Ray: device placement, DDP when world > 1
        device = next(model.parameters()).device
        # Periodic re-selection (one worker, checked before start): the optimizer holds every
        # parameter and AdamW skips those a period freezes (their gradient is None).
        params = [p for p in model.parameters() if p.requires_grad or (applied and job.reselect_every)]
        optimizer, scheduler = make_optimizer(params, job.lr, job.weight_decay, job.steps)
        if resume and not job.lora:  # a LoRA stage restarts from its start (no mid-stage checkpoint)
            load_optimizer(folder, optimizer)
    done = progress["step"]
    if resume and rank == 0:
        sys.stdout.write(f"[hft-ray] {job.label}: resuming at step {done + 1} after a worker failure\n")
    for _ in range(done):
        scheduler.step()
    periodic = None
    if applied and job.reselect_every:
        applied.remove()
        periodic = PeriodicSelection(model, applied.plan, job.reselect_every, optimizer, start_step=done)
    elif applied:
        applied.attach(optimizer)
    loss_fn = None
    if job.kind == "dpo":
        # The reference is the stage's starting model; a resumed worker reloads it for that.
        reference = load_checkpoint(job.init_checkpoint)[0] if resume else getattr(model, "module", model)
        encoded = with_reference(reference, encode_pairs(list(job.examples), tokenizer, job.max_length))
        encoded = {k: v.to(device) for k, v in encoded.items()} if device.type != "cpu" else encoded
        loss_fn = dpo_step_loss(job.beta)
    else:
        encoded = encode(list(job.examples), tokenizer, job.max_length)
    stream = batches(encoded, job.batch_size, job.seed, rank, world)
    for _ in range(done):
        next(stream)  # the batches already trained on
    data = ({k: v.to(device) for k, v in batch.items()} for batch in stream)
    losses, step_times = progress["losses"], progress["step_times"]
    last = time.perf_counter()

    def report(step: int, final: bool) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                files = {PROGRESS_FILE: {"step": step, "losses": losses, "step_times": step_times}}
                if final:
                    files = {"plan.json": job.plan, "train_log.json": {
                        "losses": losses, "train_s": sum(step_times), "step_s": statistics.median(step_times), **counts}}
                save_into(folder, merge_lora(model) if job.lora else model, tokenizer, files)
                if not final:
                    save_optimizer(folder, optimizer)
                checkpoint = ray.train.Checkpoint.from_directory(folder)  # Ray
            # Every rank must call report: it is a barrier.
            ray.train.report({"step": step, "loss": losses[-1]}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint-{step:06d}" if not final else "checkpoint")  # Ray

    def on_step(step: int, loss: float) -> None:
        nonlocal last
        now = time.perf_counter()
        step_times.append(now - last)
        losses.append(loss)
        if rank == 0 and (step % job.log_every == 0 or step == job.steps):
            # Not print(): Ray Train patches it into a logger that echoes each line twice.
            sys.stdout.write(f"[hft-ray] {job.label}: step {step}/{job.steps} loss {loss:.4f}\n")
            sys.stdout.flush()
        if job.checkpoint_every and not job.lora and step % job.checkpoint_every == 0 and step < job.steps:
            report(step, final=False)
        if periodic and step < job.steps:
            periodic.after_step(step)
        last = time.perf_counter()  # checkpoint time is not step time

    run_steps(model, optimizer, scheduler, data, job.steps, on_step=on_step, start=done, loss_fn=loss_fn)
    report(job.steps, final=True)


def run_stage(job: StageJob, storage_path: str, run_name: str, workers: int, cpus_per_worker: float,
              use_gpu: bool, max_failures: int = 0) -> StageResult:
    """Fit one TorchTrainer; `run_name` must be unique (reusing one resumes the old run). A
    failed worker group is restarted up to `max_failures` times, from the last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # Ray
    from ray.train.torch import TorchTrainer  # Ray

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config={"job": job, "cpus_per_worker": cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    log = read_json(result.checkpoint.path, "train_log.json")
    return StageResult(result.checkpoint.path, log["losses"], log["train_s"], log["step_s"],
                       log["trainable"], log["total"])
