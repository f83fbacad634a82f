"""A branch's model on its ranks, in the dtype it trains in (bfloat16 is never read through float32).

- ddp, or one worker: every rank loads the checkpoint whole, onto its device.
- fsdp: rank 0 alone holds the weights: read from the checkpoint at the branch's start, and
  between stages the state dict it gathered to write the stage's checkpoint (nothing is read
  back from storage). The other ranks build the model's structure with its parameters on the
  meta device (buffers, such as rotary frequencies, are computed as usual). `shard` gives every
  rank its FSDP2 shards and broadcasts rank 0's weights into them, so no other rank ever holds a
  whole copy.

Each stage shards afresh: FSDP2 fixes whether a unit's parameters take gradients when it first
gathers them, so a stage's selection plan is applied to the model before it is sharded.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import transformers

from hft_ray.storage import Location
from hft_ray.train.checkpoints import load_checkpoint


def train_dtype(precision: str) -> torch.dtype:
    """The dtype a branch's weights train in (bf16-mixed keeps float32 weights)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def branch_model(folder: str, job, runtime) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) from a checkpoint, as this rank trains it: whole and placed on its
    device, or under fsdp the structure alone on every rank but the first."""
    dtype = train_dtype(job.settings.precision)
    if runtime.sharded and runtime.rank != 0:
        with Location(folder).local_copy(without=(".safetensors",)) as local:  # config and tokenizer only
            config = transformers.AutoConfig.from_pretrained(str(local))
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(local))
        return runtime.place(structure(config, dtype), job), tokenizer
    model, tokenizer = load_checkpoint(folder, dtype)
    return runtime.place(model, job), tokenizer


def next_stage_model(model: torch.nn.Module, weights: dict | None, job, runtime) -> torch.nn.Module:
    """The model the next stage starts from, after a sharded stage: rank 0's from the weights it
    gathered (taken over, not copied), the structure elsewhere; sharded again by the next stage."""
    config = model.config
    del model
    fresh = structure(config, train_dtype(job.settings.precision))
    if runtime.rank == 0:
        fresh.load_state_dict(weights, assign=True)
        fresh.tie_weights()  # assign gives each key its own tensor: shared ones are shared again
    return runtime.place(fresh, job)


def structure(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model `config` describes, its parameters on the meta device (no memory, no init)."""
    with parameters_on_meta():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built here register their parameters on the meta device and their buffers as usual
    (accelerate's `init_empty_weights(include_buffers=False)`, which transformers 5 dropped)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a parameter shared again (tied weights) stays one
            kind, attributes = type(module._parameters[name]), module._parameters[name].__dict__
            module._parameters[name] = kind(module._parameters[name].to("meta"),
                                            **{**attributes, "requires_grad": param.requires_grad})

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def fill_from_rank0(model: torch.nn.Module, whole: dict, device: torch.device) -> None:
    """After `fully_shard`: rank 0's `whole` state dict broadcast into every rank's shards. A rank
    that held the structure alone first gets storage for its shards; its buffers are kept."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.is_meta for p in model.parameters()):
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.to_empty(device=device)  # in place: parameters shared by two modules stay shared
        with torch.no_grad():
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
    set_model_state_dict(model, whole if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
