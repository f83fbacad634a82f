"""Ray Train around the branch train function (hft_ray/train/branch.py). Everything here is
Ray's part: the channel that reports checkpoints to Ray Train and events to the driver, and the
task that fits one branch's TorchTrainer."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hft_ray.run.scheduler import BranchEnded, BranchFailed
from hft_ray.storage import Location
from hft_ray.train.branch import train_branch
from hft_ray.train.channel import SaveFn
from hft_ray.train.events import StageTrained
from hft_ray.train.job import BranchJob


@dataclass(frozen=True)
class Scaling:
    workers: int
    cpus_per_worker: float
    use_gpu: bool
    max_failures: int
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per worker

    @classmethod
    def of(cls, train, cpus_per_worker: float | None = None) -> Scaling:
        """A branch's worker group as the pipeline's `train` block asks (a TrainSpec)."""
        return cls(train.workers, cpus_per_worker or train.cpus_per_worker, train.use_gpu, train.max_failures,
                   dict(train.resources_per_worker))

    def per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {}), **self.resources}


class RayChannel:
    def __init__(self, events, key: str):
        self.events, self.key = events, key
        self.rank = ray.train.get_context().get_world_rank()

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()  # set when the worker group restarts after a failure
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def save(self, write: SaveFn, name: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            write(Path(folder))  # rank 0 alone under ddp, every rank's shards under fsdp
            # Ray Train merges the ranks' folders into one checkpoint.
            checkpoint = ray.train.Checkpoint.from_directory(folder) if any(Path(folder).iterdir()) else None
            # Every rank must call report: it is a barrier. The controller takes the checkpoint up
            # when it next polls the workers.
            ray.train.report({"checkpoint": name}, checkpoint=checkpoint)

    def notify(self, event: object) -> None:
        if self.rank == 0:
            if isinstance(event, StageTrained):  # the node it trained on, for the stage's MLflow run
                event = replace(event, node=ray.get_runtime_context().get_node_id())
            sent = self.events.put.remote(self.key, event)
            if isinstance(event, StageTrained):
                ray.get(sent)  # delivered before the branch can end


def branch_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    train_branch(config["job"], RayChannel(config["events"], config["key"]))


def fit_branch(job: BranchJob, events, key: str, storage: str, run_name: str, scaling: Scaling) -> None:
    """Fit the branch's TorchTrainer (blocking: the runner calls it in a thread of the driver);
    its end, or its failure, goes into `events` after every event its workers sent. `run_name`
    must be new: reusing one resumes that old Ray Train run. `storage` (a folder or an object-store
    prefix) holds Ray Train's resumable checkpoints."""
    path, filesystem = Location(storage).for_ray()
    try:
        TorchTrainer(
            branch_worker,
            train_loop_config={"job": job, "events": events, "key": key},
            scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=scaling.per_worker()),
            run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=filesystem,
                                 failure_config=FailureConfig(max_failures=scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        ).fit()
    except Exception as error:  # Ray Train's TrainingFailedError and what it wraps
        ray.get(events.put.remote(key, BranchFailed(job.name, innermost_message(error))))
        return
    ray.get(events.put.remote(key, BranchEnded(job.name)))


def innermost_message(error: BaseException) -> str:
    """The innermost message of a Ray error chain, in one line."""
    cause = getattr(error, "cause", None) or error.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause or error).strip().splitlines()
    return text[-1] if text else type(error).__name__
