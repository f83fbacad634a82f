"""The base models branches start from, as checkpoints: built or loaded from `model.source`,
and with a `pretrain` block trained on its domains (stage 0) first, in a worker group of their
own. One base, or one per seed (hft_ray/run/layout.py): nodes of the scheduler's DAG, which
`hft-ray run` makes beside its branches and a Tune search before its trials (`make_bases`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hft_ray.config.spec import PipelineSpec
from hft_ray.run.cluster import Capacity
from hft_ray.run.layout import Layout
from hft_ray.run.manifest import Manifest
from hft_ray.run.progress import Board
from hft_ray.run.ray_worker import Scaling
from hft_ray.run.runner import RayRunner, RunFailure
from hft_ray.run.scheduler import Base, BaseEvaluated, BranchFailed, Pretrain, Scheduler
from hft_ray.storage import Location
from hft_ray.train.checkpoints import write_checkpoint, write_folder
from hft_ray.train.events import StageStarted, StageTrained, StepsDone
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


def pretrain_threads(spec: PipelineSpec, have: Capacity, side_by_side: int = 1) -> int:
    """Pretraining runs before the branches that start from it train: the workers of the bases
    pretraining side by side share this node's CPUs."""
    return max(1, int(min(have.cpus, os.cpu_count() or 1) // (spec.train.workers * side_by_side)))


def bases(spec: PipelineSpec, layout: Layout, manifest: Manifest) -> list[Base]:
    """The run's bases as the scheduler takes them: each written as `model.source` gives it (or
    as an earlier attempt left it), and still to be pretrained where there is a `pretrain` block."""
    nodes = []
    for node in layout.bases.values():
        entry, pretrain_from = manifest.base(node.key), None
        checkpoint = entry.get("checkpoint")
        if not checkpoint:
            start = initial_checkpoint(spec.for_seed(node.seed), node.folder)
            if spec.pretrain:
                pretrain_from, checkpoint = start, str(node.folder / "base")
            else:
                entry["checkpoint"] = checkpoint = start
        nodes.append(Base(node.key, checkpoint, node.job_name, pretrain_from, entry.get("scores")))
    manifest.save()
    return nodes


def launch_pretrain(spec: PipelineSpec, layout: Layout, action: Pretrain, runner: RayRunner, threads: int,
                    run_name: str, board: Board) -> None:
    t, base = spec.train, layout.bases[action.base]
    board.say(f"[hft-ray] {base.job_name} on {', '.join(spec.pretrain.domains)}: {spec.pretrain.steps} steps")
    runner.launch(layout.planners[base.seed].pretrain(action.start, threads, base.job_name), run_name,
                  Scaling.of(t, max(t.cpus_per_worker, threads)))


def make_bases(spec: PipelineSpec, layout: Layout, manifest: Manifest, runner: RayRunner, board: Board,
               have: Capacity, run_name: Callable[[str], str], slots: int) -> dict[str, Base]:
    """Every base of the run, pretrained and evaluated (what is in the manifest is kept): a
    scheduler with no branches, before a Tune search's trials."""
    nodes = bases(spec, layout, manifest)
    scheduler = Scheduler([], len(spec.stages), slots, nodes)
    side_by_side = min(slots, sum(not b.ready for b in nodes)) or 1

    def act(actions) -> None:
        for action in actions:
            if isinstance(action, Pretrain):
                launch_pretrain(spec, layout, action, runner, pretrain_threads(spec, have, side_by_side),
                                run_name(layout.bases[action.base].job_name), board)
            else:
                runner.evaluate(action)

    act(scheduler.start())
    for event in runner.events():
        if isinstance(event, StageStarted):
            board.stage_started(event.branch, event.branch, event.steps)
        elif isinstance(event, StepsDone):
            board.steps_done(event.branch, event.branch, event.step, event.steps, event.loss, event.steps_per_s)
        elif isinstance(event, StageTrained):
            manifest.base(layout.base_of_job(event.branch).key)["checkpoint"] = event.checkpoint
            board.say(f"[hft-ray] {event.branch} done: loss {event.losses[-1]:.4f} in {event.train_s:.0f}s")
        elif isinstance(event, BaseEvaluated):
            manifest.base(event.base)["scores"] = event.row
        elif isinstance(event, BranchFailed):
            raise RunFailure(f"{event.branch} failed: {event.reason}; logs under {layout.folder / 'ray'}")
        manifest.save()
        act(scheduler.on(event))
    return scheduler.bases
