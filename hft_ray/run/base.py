"""The base model every branch starts from, as a checkpoint: built or loaded from
`model.source`, and with a `pretrain` block trained on its domains (stage 0) first.

`hft-ray run` pretrains in the first branch's worker group (hft_ray/run/scheduler.py); a Tune
search makes its base once, before any trial, in a worker group of its own (`base_checkpoint`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hft_ray.config.spec import PipelineSpec
from hft_ray.run.cluster import Capacity
from hft_ray.run.planner import Planner
from hft_ray.run.progress import Board
from hft_ray.run.ray_worker import Scaling
from hft_ray.run.runner import RayRunner, RunFailure
from hft_ray.run.scheduler import BranchFailed
from hft_ray.storage import Location
from hft_ray.train.checkpoints import write_checkpoint, write_folder
from hft_ray.train.events import StageTrained, StepsDone
from hft_ray.train.models import ModelSource, load_model, load_tokenizer, resolve_source


def initial_checkpoint(spec: PipelineSpec, folder: Location) -> str:
    """The model as `model.source` gives it, written as a checkpoint: the base itself, or with a
    `pretrain` block what pretraining starts from. In the source's dtype: a model folder's
    safetensors files are linked (copied across file systems), never loaded here; other sources
    are loaded in their own dtype and saved."""
    trust = spec.model.trust_remote_code
    tokenizer = load_tokenizer(spec.model.source, trust, spec.model.chat_template)
    destination = folder / ("init" if spec.pretrain else "base")
    source = resolve_source(spec.model.source)
    if weights_folder(source) is not None:
        return write_folder(destination, lambda staging: link_weights(weights_folder(source), staging, tokenizer))
    model = load_model(spec.model.source, seed=spec.seed, trust_remote_code=trust)
    return write_checkpoint(destination, model, tokenizer)


def weights_folder(source: ModelSource) -> Path | None:
    """A local model folder whose weights are all in safetensors files."""
    if source.is_builtin or source.gguf_file or not Path(source.name).is_dir():
        return None
    folder = Path(source.name)
    return folder if any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")) else None


def link_weights(source: Path, staging: Path, tokenizer) -> None:
    """The source's config, code and safetensors files (hard links where the file system allows),
    and the tokenizer as hft-ray uses it (its chat template included)."""
    for file in source.iterdir():
        if file.is_file() and (file.suffix in (".safetensors", ".py") or file.name in LINKED_JSON
                               or file.name.endswith(".safetensors.index.json")):
            try:
                os.link(file.resolve(), staging / file.name)
            except OSError:
                shutil.copyfile(file, staging / file.name)
    tokenizer.save_pretrained(staging)


LINKED_JSON = ("config.json", "generation_config.json")


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
