"""A branch job under torchrun for the tests: rank 0's events go to a JSON-lines file;
`--crash-at STAGE STEP` stops the group there (every rank, as a dead node would); `--ranks DIR`
has every rank write, after each stage's steps, its optimizer state's bytes and the dtypes its
weights computed in (DIR/rank-R-stage-S.json)
and, unsharded, its weights (DIR/rank-R-stage-S.safetensors)."""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

import hft_ray.train.stage as stage_module
from hft_ray.train.branch import train_branch
from hft_ray.train.channel import LocalChannel
from hft_ray.train.events import StepsDone
from hft_ray.train.job import BranchJob

parser = argparse.ArgumentParser()
parser.add_argument("job", type=Path)
parser.add_argument("events", type=Path)
parser.add_argument("--crash-at", type=int, nargs=2)
parser.add_argument("--ranks", type=Path)
args = parser.parse_args()


def record(event) -> None:
    with args.events.open("a") as out:
        out.write(json.dumps({"kind": type(event).__name__, **dataclasses.asdict(event)}) + "\n")
    if args.crash_at and isinstance(event, StepsDone) and [event.stage, event.step] == args.crash_at:
        os._exit(3)  # rank 0 dies; torchrun stops the other rank


def record_ranks(folder: Path) -> None:
    """Wrap the stage's `fit_stage` (to know the stage) and `run_steps` (to see the model and
    optimizer once the steps are done). Counted here, not with hft_ray's `optimizer_bytes`."""
    fit_stage, run_steps, current = stage_module.fit_stage, stage_module.run_steps, {}

    def fit_stage_seen(model, tokenizer, job, stage, *rest, **kwargs):
        current["stage"] = stage.index
        return fit_stage(model, tokenizer, job, stage, *rest, **kwargs)

    def run_steps_seen(model, optimizer, *rest, **kwargs):
        seen = set()  # the dtype the layers' weights have while they compute
        hook = getattr(model, "module", model).model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda module, args: seen.add(str(module.weight.dtype)))
        losses = run_steps(model, optimizer, *rest, **kwargs)
        hook.remove()
        rank, name = dist.get_rank(), f"rank-{dist.get_rank()}-stage-{current['stage']}"
        params = {p: n for n, p in getattr(model, "module", model).named_parameters()}
        entries, other = {}, 0  # state shaped like its parameter (AdamW's moments); the rest (steps)
        for param, state in optimizer.state.items():
            for value in state.values():
                local = value.to_local() if hasattr(value, "to_local") else value
                if value.shape == param.shape:  # global shapes (DTensor) under fsdp
                    entries[params[param]] = entries.get(params[param], 0) + local.numel() * local.element_size()
                else:
                    other += local.numel() * local.element_size()
        (folder / f"{name}.json").write_text(json.dumps({"rank": rank, "entry_bytes": entries, "other_bytes": other,
                                                        "compute_dtypes": sorted(seen)}))
        if not hasattr(next(iter(params)), "to_local"):  # whole tensors on this rank: ddp
            weights = getattr(model, "module", model).state_dict()
            save_file({n: t.detach().clone() for n, t in weights.items()}, str(folder / f"{name}.safetensors"))
        return losses

    folder.mkdir(parents=True, exist_ok=True)
    stage_module.fit_stage, stage_module.run_steps = fit_stage_seen, run_steps_seen


if args.ranks:
    record_ranks(args.ranks)
train_branch(BranchJob.load(args.job), LocalChannel(args.job.parent, record))
if dist.is_initialized():
    dist.destroy_process_group()
