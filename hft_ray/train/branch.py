"""The function every worker of a branch runs: the branch's stages, one after another, in the
same process (group), each ending in a checkpoint written whole and a `StageTrained` event.

Plain torch + torch.distributed: it runs alone, under torchrun (`python -m hft_ray.train`) and
under Ray Train (hft_ray/run/ray_worker.py wraps it in a few lines).
"""

from __future__ import annotations

from hft_ray.train.channel import Channel
from hft_ray.train.checkpoints import is_whole, read_json
from hft_ray.train.job import BranchJob, StageJob
from hft_ray.train.loading import branch_model
from hft_ray.train.resumable import Progress, holds_weights, write_progress
from hft_ray.train.runtime import Runtime, start_runtime
from hft_ray.train.stage import TRAIN_LOG_FILE, train_stage, trained_event


def train_branch(job: BranchJob, channel: Channel) -> None:
    runtime = start_runtime(job.threads, job.settings.strategy)
    with channel.restored() as folder:  # set when the worker group restarts after a failure
        progress = Progress.read(folder) if folder else None
        if progress is not None and progress.stage > job.stages[-1].index:
            return  # every stage was done before the restart
        first = progress.stage if progress else job.stages[0].index
        mid_stage = progress is not None and progress.step > 0
        model, tokenizer = branch_model(folder if mid_stage and holds_weights(folder) else job.start_of(first),
                                        job, runtime)
        for stage in job.stages:
            if stage.index < first:
                continue
            if is_whole(stage.output):
                model = already_trained(job, stage, runtime, channel)
                continue
            here = progress if mid_stage and stage.index == first else None
            model = train_stage(model, tokenizer, job, stage, runtime, channel, here, folder)


def already_trained(job: BranchJob, stage: StageJob, runtime: Runtime, channel: Channel):
    """A stage whose checkpoint was written before a restart (of the workers or of the driver):
    its checkpoint is the model, and the driver hears of it again (it drops what it knows)."""
    if runtime.rank == 0:
        channel.notify(trained_event(job, stage, read_json(stage.output, TRAIN_LOG_FILE)))
    channel.save(lambda folder: write_progress(folder, Progress(stage.index + 1), runtime),
                 f"{job.name}-stage{stage.index}-end")
    return branch_model(stage.output, job, runtime)[0]
