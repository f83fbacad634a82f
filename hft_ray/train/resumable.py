"""Resumable checkpoints, taken every `checkpoint_every` steps and at each stage's end, and read
back by a restarted worker group. Every rank calls `write` and `read` (through the channel):

- ddp: rank 0 writes the model (safetensors, loadable with `from_pretrained`) and the AdamW
  state (safetensors + JSON); the model is read back when the branch loads it;
- fsdp: every rank writes its shards of the model and of the AdamW state with
  torch.distributed.checkpoint, so an 8B model is never gathered for a resumable checkpoint;
  they are read back into the sharded model and optimizer.

`progress.json` (rank 0) says where the branch was. Plain torch: no Ray.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hft_ray.train.checkpoints import read_optimizer, save_into, save_optimizer
from hft_ray.train.runtime import Runtime

PROGRESS_FILE = "progress.json"
SHARDS = "shards"  # torch.distributed.checkpoint's folder, under fsdp


@dataclass
class Progress:
    """How far a branch got: stage `stage`, optimizer step `step` (0: the stage has not begun)."""

    stage: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)

    @classmethod
    def read(cls, folder: Path) -> Progress:
        return cls(**json.loads((Path(folder) / PROGRESS_FILE).read_text()))


def write_progress(folder: Path, progress: Progress, runtime: Runtime) -> None:
    """A stage's end: only where the branch is (its weights are the stage's checkpoint)."""
    if runtime.rank == 0:
        (Path(folder) / PROGRESS_FILE).write_text(json.dumps(asdict(progress)))


def write_state(folder: Path, progress: Progress, model, optimizer, tokenizer, runtime: Runtime) -> None:
    """Mid-stage: where the branch is, its weights and its optimizer state."""
    write_progress(folder, progress, runtime)
    if runtime.sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        weights, state = get_state_dict(model, optimizer)
        dcp.save({"model": weights, "optimizer": state}, checkpoint_id=str(Path(folder) / SHARDS))
    elif runtime.rank == 0:
        save_into(folder, model, tokenizer)
        save_optimizer(folder, optimizer)


def holds_weights(folder: Path) -> bool:
    """Whether the branch loads its model from this checkpoint (ddp) rather than from the
    stage's start, resharded and then filled from the shards (fsdp)."""
    return (Path(folder) / "config.json").is_file()


def read_state(folder: Path, model, optimizer, runtime: Runtime) -> None:
    """Fill the optimizer (and under fsdp the sharded model) from a mid-stage checkpoint."""
    if runtime.sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        weights, state = get_state_dict(model, optimizer)
        dcp.load({"model": weights, "optimizer": state}, checkpoint_id=str(Path(folder) / SHARDS))
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=state)
    else:
        optimizer.load_state_dict(read_optimizer(folder))


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (its shards under fsdp)."""
    local = [t.to_local() if hasattr(t, "to_local") else t
             for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local)
