"""One stage in a branch's worker group: apply the method, train, write the stage's checkpoint.
Plain torch + torch.distributed; the channel is the only way out (hft_ray/train/channel.py)."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hft_ray.data.encoding import batches
from hft_ray.train.checkpoints import load_checkpoint, save_into, save_optimizer, write_checkpoint
from hft_ray.train.events import StageResumed, StageStarted, StageTrained, StepsDone
from hft_ray.train.job import BranchJob, StageJob
from hft_ray.train.losses import stage_data
from hft_ray.train.loop import make_optimizer, run_steps
from hft_ray.train.methods import build_method
from hft_ray.train.precision import autocast
from hft_ray.train.runtime import Runtime, unwrap

PROGRESS_FILE = "progress.json"
TRAIN_LOG_FILE = "train_log.json"
PLAN_FILE = "plan.json"


@dataclass
class Progress:
    """How far a branch got: stage `stage`, optimizer step `step` (0: the stage has not begun).
    Written into every resumable checkpoint."""

    stage: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)


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
        every, steps = self.job.log_every, self.stage.steps
        if self.runtime.rank == 0 and (step % every == 0 or step == steps):
            recent = self.progress.step_times[-every:]
            self.channel.notify(StepsDone(self.job.name, self.stage.index, step, steps, loss, len(recent) / sum(recent)))
            # Not print(): Ray Train patches it into a logger that echoes each line twice.
            sys.stdout.write(f"[hft-ray] {self.stage.label}: step {step}/{steps} loss {loss:.4f}\n")
            sys.stdout.flush()
        if self.save and self.job.checkpoint_every and step % self.job.checkpoint_every == 0 and step < steps:
            self.save(self.progress)
        self.last = time.perf_counter()  # checkpoint time is not step time

    def log(self, counts: dict) -> dict:
        times = self.progress.step_times
        return {"losses": self.progress.losses, "train_s": sum(times), "step_s": statistics.median(times), **counts}


def train_stage(model: torch.nn.Module, tokenizer, job: BranchJob, stage: StageJob, runtime: Runtime, channel,
                resume: Progress | None = None, optimizer_state: dict | None = None) -> torch.nn.Module:
    """Train `stage` on `model` (on `runtime.device`); returns the trained plain model. With
    `resume` (step > 0) the model is the resumable checkpoint's and training goes on from there."""
    torch.manual_seed(stage.seed)
    data = stage_data(stage, job, tokenizer, _reference(model, job, stage, resume, runtime), runtime.device)
    method = build_method(stage, job)
    model = method.prepare(model, tokenizer, runtime)
    counts = method.counts(model)
    if runtime.rank == 0:
        channel.notify(StageStarted(job.name, stage.index, stage.steps, method.describe(), **counts))
    trained = runtime.wrap(model)
    optimizer, scheduler = make_optimizer(method.parameters(model), stage.lr, job.weight_decay, stage.steps)
    progress = resume if resume is not None and resume.step and method.resumable else Progress(stage.index)
    if progress.step:
        optimizer.load_state_dict(optimizer_state)
        with warnings.catch_warnings():  # stepping the schedule forward to where it was, before any step
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(progress.step):
                scheduler.step()
        if runtime.rank == 0:
            channel.notify(StageResumed(job.name, stage.index, progress.step))
            sys.stdout.write(f"[hft-ray] {stage.label}: resuming at step {progress.step + 1} after a worker failure\n")
    method.attach(optimizer, progress.step)

    def save(now: Progress) -> None:
        def write(folder):
            save_into(folder, unwrap(trained), tokenizer, {PROGRESS_FILE: asdict(now)})
            save_optimizer(folder, optimizer)
        channel.save(write, f"{job.name}-stage{stage.index}-step{now.step:06d}")

    recorder = StageRecorder(job, stage, runtime, channel, progress, save if method.resumable else None)

    def on_step(step: int, loss: float) -> None:
        recorder.on_step(step, loss)
        method.after_step(step)

    with _threads(stage, runtime):
        run_steps(trained, optimizer, scheduler, _feed(data.tensors, job, stage, runtime, progress.step), stage.steps,
                  on_step=on_step, start=progress.step, loss_fn=data.loss_fn,
                  forward_context=lambda: autocast(job.precision, runtime.device))
    model = method.finish(unwrap(trained))
    finish_stage(model, tokenizer, job, stage, runtime, channel, method.describe(), recorder.log(counts))
    return model


def _reference(model, job: BranchJob, stage: StageJob, resume: Progress | None, runtime: Runtime):
    """The model the stage starts from (DPO's reference): `model`, unless the stage is resumed
    mid-way; then it is loaded again (only DPO needs it)."""
    if resume is None or not resume.step or stage.loss != "dpo":
        return model
    return runtime.place(load_checkpoint(job.start_of(stage.index))[0], job)


def _feed(tensors: dict, job: BranchJob, stage: StageJob, runtime: Runtime, done: int):
    """This rank's batches on its device, past the `done` batches already trained on."""
    stream = batches(tensors, job.batch_size, stage.seed, runtime.rank, runtime.world)
    for _ in range(done):
        next(stream)
    return ({k: v.to(runtime.device) for k, v in batch.items()} for batch in stream)


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
                 log: dict) -> None:
    """Write the stage's checkpoint whole (rank 0), tell the driver, then mark the branch as past
    this stage, so a restarted group goes on from the next one."""
    if runtime.rank == 0:
        write_checkpoint(stage.output, model, tokenizer, {PLAN_FILE: selection, TRAIN_LOG_FILE: log})
        channel.notify(trained_event(job, stage, log))
    runtime.barrier()
    channel.save(lambda folder: save_into_progress(folder, Progress(stage.index + 1)), f"{job.name}-stage{stage.index}-end")


def trained_event(job: BranchJob, stage: StageJob, log: dict) -> StageTrained:
    return StageTrained(job.name, stage.index, stage.output, log["losses"], log["train_s"], log["step_s"],
                        log["trainable"], log["total"])


def save_into_progress(folder, progress: Progress) -> None:
    (Path(folder) / PROGRESS_FILE).write_text(json.dumps(asdict(progress)))
