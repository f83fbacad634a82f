"""One stage in a branch's worker group: apply the method, train, write the stage's checkpoint.
Plain torch + torch.distributed; the channel is the only way out (hft_ray/train/channel.py)."""

from __future__ import annotations

import contextlib
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from hft_ray.train.checkpoints import load_checkpoint, write_checkpoint
from hft_ray.train.events import StageResumed, StageStarted, StageTrained, StepsDone
from hft_ray.train.job import BranchJob, StageJob
from hft_ray.train.loading import next_stage_model, train_dtype
from hft_ray.train.loop import make_optimizer, run_steps
from hft_ray.train.losses import StageData, stage_data
from hft_ray.train.methods import build_method
from hft_ray.train.precision import autocast, cast
from hft_ray.train.resumable import Progress, optimizer_bytes, read_state, write_progress, write_state
from hft_ray.train.runtime import Runtime, unwrap

TRAIN_LOG_FILE = "train_log.json"
PLAN_FILE = "plan.json"


class StageRecorder:
    """Step times, losses, progress events and resumable checkpoints, as the steps go by."""

    def __init__(self, job: BranchJob, stage: StageJob, runtime: Runtime, channel, progress: Progress, save):
        self.job, self.stage, self.runtime, self.channel = job, stage, runtime, channel
        self.progress, self.save = progress, save
        self.last = time.perf_counter()

    def on_step(self, step: int, loss: float) -> None:
        self.progress.step_times.append(time.perf_counter() - self.last)
        self.progress.losses.append(loss)
        self.progress.step = step
        every, steps = self.job.settings.log_every, self.stage.steps
        if self.runtime.rank == 0 and (step % every == 0 or step == steps):
            recent = self.progress.step_times[-every:]
            steps_per_s = len(recent) / sum(recent)
            self.channel.notify(StepsDone(self.job.name, self.stage.index, step, steps, loss, steps_per_s))
            # Not print(): Ray Train patches it into a logger that echoes each line twice.
            sys.stdout.write(f"[hft-ray] {self.stage.label}: step {step}/{steps} loss {loss:.4f}\n")
            sys.stdout.flush()
        every_save = self.job.settings.checkpoint_every
        if self.save and every_save and step % every_save == 0 and step < steps:
            self.save(self.progress)
        self.last = time.perf_counter()  # checkpoint time is not step time

    def log(self, counts: dict) -> dict:
        times = self.progress.step_times
        return {"losses": self.progress.losses, "train_s": sum(times), "step_s": statistics.median(times),
                "step_times": times, **counts}


def train_stage(model: torch.nn.Module, tokenizer, job: BranchJob, stage: StageJob, runtime: Runtime, channel,
                resume: Progress | None = None, resume_folder: Path | None = None) -> torch.nn.Module:
    """Train `stage` on `model` (on `runtime.device`) and write its checkpoint; returns the plain
    model the next stage starts from. With `resume` (step > 0), training goes on from the
    checkpoint in `resume_folder`."""
    model, selection, log = fit_stage(model, tokenizer, job, stage, runtime, channel, resume, resume_folder)
    return finish_stage(model, tokenizer, job, stage, runtime, channel, selection, log)


def fit_stage(model: torch.nn.Module, tokenizer, job: BranchJob, stage: StageJob, runtime: Runtime, channel,
              resume: Progress | None = None, resume_folder: Path | None = None) -> tuple[torch.nn.Module, dict, dict]:
    """The stage's optimizer steps: (the trained plain model, what it trained, its training log)."""
    torch.manual_seed(stage.seed)
    runtime.reset_memory_peaks()
    method = build_method(stage, job)
    model = method.prepare(model, tokenizer, runtime)
    counts = method.counts(model)
    if runtime.rank == 0:
        channel.notify(StageStarted(job.name, stage.index, stage.steps, method.describe(), **counts))
    trained = runtime.wrap(model, job.settings.precision)
    data = stage_data(stage, job, tokenizer, _reference(trained, job, stage, resume, runtime))
    s = job.settings
    optimizer, scheduler = make_optimizer(method.parameters(model), stage.lr, s.weight_decay, stage.steps,
                                          kahan=s.precision == "bf16" and s.bf16_kahan)
    progress = resume if resume is not None and resume.step and method.resumable else Progress(stage.index)
    if progress.step:
        _resume(progress, resume_folder, trained, optimizer, scheduler, job, stage, runtime, channel)
    method.attach(optimizer, progress.step)

    def save(now: Progress) -> None:
        channel.save(lambda folder: write_state(folder, now, unwrap(trained), optimizer, tokenizer, runtime),
                     f"{job.name}-stage{stage.index}-step{now.step:06d}")

    recorder = StageRecorder(job, stage, runtime, channel, progress, save if method.resumable else None)

    def on_step(step: int, loss: float) -> None:
        recorder.on_step(step, loss)
        method.after_step(step)

    with _threads(stage, runtime):
        run_steps(trained, optimizer, scheduler, _feed(data, tokenizer, job, stage, runtime, progress.step),
                  stage.steps, on_step=on_step, start=progress.step, loss_fn=data.loss_fn,
                  forward_context=lambda: autocast(job.settings.precision, runtime.device), reduce=runtime.mean)
    model = method.finish(unwrap(trained))
    return model, method.describe(), {**recorder.log(counts), "optimizer_bytes": optimizer_bytes(optimizer),
                                      "memory": runtime.memory_peaks()}


def _resume(progress: Progress, folder: Path, model, optimizer, scheduler, job: BranchJob, stage: StageJob,
            runtime: Runtime, channel) -> None:
    """Where a restarted group picks the stage up: optimizer (and, sharded, model) state, the
    learning-rate schedule stepped on."""
    read_state(folder, model, optimizer, runtime)
    with warnings.catch_warnings():  # stepping the schedule forward to where it was, before any step
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
        for _ in range(progress.step):
            scheduler.step()
    if runtime.rank == 0:
        channel.notify(StageResumed(job.name, stage.index, progress.step))
        sys.stdout.write(f"[hft-ray] {stage.label}: resuming at step {progress.step + 1} after a worker failure\n")


def _reference(trained, job: BranchJob, stage: StageJob, resume: Progress | None, runtime: Runtime):
    """The model the stage starts from (DPO's reference): the wrapped model before its first step
    (sharded, every rank runs its forward passes), unless the stage is resumed mid-way; then it is
    loaded again (only DPO needs it), whole on each rank."""
    if resume is None or not resume.step or stage.loss != "dpo":
        return trained if runtime.sharded else unwrap(trained)
    model, _ = load_checkpoint(job.start_of(stage.index), train_dtype(job.settings.precision))
    return cast(model, job.settings.precision).to(runtime.device)


def _feed(data: StageData, tokenizer, job: BranchJob, stage: StageJob, runtime: Runtime, done: int):
    """This rank's micro-batches of each step on its device, past the `done` steps already trained."""
    for micro_batches in data.steps(job, stage, tokenizer, runtime.rank, runtime.world, done):
        yield [{k: v.to(runtime.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
               for batch in micro_batches]


@contextlib.contextmanager
def _threads(stage: StageJob, runtime: Runtime):
    """A stage's own thread count on CPU (pretraining takes the CPUs the branches are yet to use)."""
    before = torch.get_num_threads()
    if stage.threads and runtime.device.type == "cpu":
        torch.set_num_threads(stage.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finish_stage(model, tokenizer, job: BranchJob, stage: StageJob, runtime: Runtime, channel, selection: dict,
                 log: dict) -> torch.nn.Module:
    """Write the stage's checkpoint whole (rank 0; under fsdp gathered from the shards), tell the
    driver, then mark the branch as past this stage, so a restarted group goes on from the next
    one. Returns the model the next stage starts from (under fsdp, rank 0's from the gathered
    weights, to be sharded under the next stage's plan: train/loading.py)."""
    weights = None
    if runtime.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if runtime.rank == 0:
        write_checkpoint(stage.output, model, tokenizer, {PLAN_FILE: selection, TRAIN_LOG_FILE: log}, weights)
        channel.notify(trained_event(job, stage, log))
    runtime.barrier()
    channel.save(lambda folder: write_progress(folder, Progress(stage.index + 1), runtime),
                 f"{job.name}-stage{stage.index}-end")
    if runtime.sharded:
        return next_stage_model(model, weights, job, runtime)
    return model


def trained_event(job: BranchJob, stage: StageJob, log: dict) -> StageTrained:
    return StageTrained(job.name, stage.index, stage.output, log["losses"], log["train_s"], log["step_s"],
                        log["trainable"], log["total"], memory=log.get("memory", {}))
