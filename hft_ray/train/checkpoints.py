"""Stage checkpoints: safetensors weights + config + tokenizer (loadable with
`from_pretrained`) + JSON side files (the selection plan, the training log).

A checkpoint is whole or absent: in a folder it is written into a temporary sibling and renamed
into place; in an object store (hft_ray/storage.py) it is written here, then uploaded with its
`config.json` last, and `is_whole` asks for that file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import transformers

from hft_ray.storage import Location

# Per-shard progress bars on every load and save drown the pipeline's own progress lines.
transformers.utils.logging.disable_progress_bar()


MARKER = "config.json"  # written last: a checkpoint that has it is whole


def write_checkpoint(directory: str | Path, model, tokenizer, files: dict[str, object] | None = None,
                     state_dict: dict | None = None) -> str:
    """Save whole or not at all; `files` maps a JSON file name to its content; `state_dict`, the
    weights if not the model's own (gathered from FSDP shards). Returns where it went."""
    return write_folder(directory, lambda staging: save_into(staging, model, tokenizer, files, state_dict))


def write_folder(directory: str | Path, fill: Callable[[Path], None]) -> str:
    """A checkpoint `fill` writes into a temporary folder, put in place whole or not at all."""
    location = Location(directory)
    if location.remote:
        with tempfile.TemporaryDirectory(prefix="hft-ray-checkpoint-") as staging:
            fill(Path(staging))
            location.upload(Path(staging), last=MARKER)
        return str(location)
    directory = location.path
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        fill(staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(directory)


def save_into(directory: str | Path, model, tokenizer, files: dict[str, object] | None = None,
              state_dict: dict | None = None) -> None:
    """Save into an existing (temporary) folder, e.g. one Ray Train then persists."""
    directory = Path(directory)
    model = getattr(model, "module", model)  # unwrap DDP
    # A shallow copy: save_pretrained pops each tensor it has written (the caller keeps its dict).
    weights = {"state_dict": dict(state_dict)} if state_dict else {}
    model.save_pretrained(directory, safe_serialization=True, **weights)
    tokenizer.save_pretrained(directory)
    for name, content in (files or {}).items():
        (directory / name).write_text(json.dumps(content))


def load_checkpoint(directory: str | Path, dtype=None):
    """(model, tokenizer) from a checkpoint folder (or object-store prefix, downloaded for the
    load); weights only from safetensors, in `dtype` (None: float32; "auto": the checkpoint's)."""
    with Location(directory).local_copy() as folder:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


def read_json(directory: str | Path, name: str):
    return json.loads((Location(directory) / name).read_text())


OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"


def save_optimizer(directory: str | Path, optimizer) -> None:
    """An optimizer's state as safetensors (tensors) + JSON (param groups): no pickle."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().contiguous().cpu()
               for index, entry in state["state"].items() for name, value in entry.items()}
    save_file(tensors, str(Path(directory) / OPTIMIZER_TENSORS))
    (Path(directory) / OPTIMIZER_GROUPS).write_text(json.dumps(state["param_groups"]))


def read_optimizer(directory: str | Path) -> dict:
    """The optimizer state `save_optimizer` wrote, as `optimizer.load_state_dict` takes it."""
    from safetensors.torch import load_file

    state: dict[int, dict] = {}
    for key, value in load_file(str(Path(directory) / OPTIMIZER_TENSORS)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": read_json(directory, OPTIMIZER_GROUPS)}


def is_whole(directory: str | Path) -> bool:
    """Whether a checkpoint was written whole there (its marker is there)."""
    return (Location(directory) / MARKER).is_file()
