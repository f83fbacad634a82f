"""The base model every branch starts from, as a checkpoint: built or loaded from
`model.source`, and with a `pretrain` block trained on its domains (stage 0) first.

`hft-ray run` pretrains in the first branch's worker group (hft_ray/run/scheduler.py); a Tune
search makes its base once, before any trial, in a worker group of its own (`base_checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hft_ray.config.spec import PipelineSpec
from hft_ray.run.cluster import Capacity
from hft_ray.run.planner import Planner
from hft_ray.run.progress import Board
from hft_ray.run.ray_worker import Scaling
from hft_ray.run.runner import RayRunner, RunFailure
from hft_ray.run.scheduler import BranchFailed
from hft_ray.storage import Location
from hft_ray.train.checkpoints import write_checkpoint
from hft_ray.train.events import StageTrained, StepsDone
from hft_ray.train.models import load_model, load_tokenizer


def initial_checkpoint(spec: PipelineSpec, folder: Location) -> str:
    """The model as `model.source` gives it, written as a checkpoint: the base itself, or with a
    `pretrain` block what pretraining starts from."""
    trust = spec.model.trust_remote_code
    model = load_model(spec.model.source, seed=spec.seed, trust_remote_code=trust)
    tokenizer = load_tokenizer(spec.model.source, trust, spec.model.chat_template)
    return write_checkpoint(folder / ("init" if spec.pretrain else "base"), model, tokenizer)


def pretrain_threads(spec: PipelineSpec, have: Capacity) -> int:
    """Pretraining runs before any branch trains: its workers share this node's CPUs."""
    return max(1, int(min(have.cpus, os.cpu_count() or 1) // spec.train.workers))


def base_checkpoint(spec: PipelineSpec, planner: Planner, runner: RayRunner, board: Board, have: Capacity,
                    run_name: Callable[[str], str]) -> str:
    """Write the base model, and pretrain it in a worker group of its own; its checkpoint folder."""
    start = initial_checkpoint(spec, planner.folder)
    if spec.pretrain is None:
        return start
    t, threads = spec.train, pretrain_threads(spec, have)
    board.say(f"[hft-ray] pretrain on {', '.join(spec.pretrain.domains)}: {spec.pretrain.steps} steps")
    board.stage_started("pretrain", "pretrain", spec.pretrain.steps)
    runner.launch(planner.pretrain(start, threads), run_name("pretrain"),
                  Scaling.of(t, max(t.cpus_per_worker, threads)))
    for event in runner.events():
        if isinstance(event, StepsDone):
            board.steps_done("pretrain", "pretrain", event.step, event.steps, event.loss, event.steps_per_s)
        elif isinstance(event, StageTrained):
            board.say(f"[hft-ray] pretrain done: loss {event.losses[-1]:.4f} in {event.train_s:.0f}s")
        elif isinstance(event, BranchFailed):
            raise RunFailure(f"pretrain failed: {event.reason}; logs under {planner.folder / 'ray'}")
    return str(planner.base)
