"""A branch's numeric precision:

- `fp32`: weights, gradients and AdamW state in float32 (the default on CPU);
- `bf16`: pure bfloat16, weights, gradients and AdamW state alike, as torchtune trains on one
  device: half the memory of fp32 for every one of them;
- `bf16-mixed`: float32 weights and optimizer, the forward pass under bf16 autocast (the default
  on GPUs).

Frozen entries stay bitwise unchanged in each (tests/core/test_freezing.py): whole frozen tensors
never reach the optimizer, and the restore hook writes masked entries back in the tensor's dtype.
A checkpoint keeps the dtype the model trained in.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "bf16-mixed")


def cast(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model in the dtype its weights train in."""
    return model.to(torch.bfloat16) if precision == "bf16" else model


def autocast(precision: str, device: torch.device):
    """The context the forward pass (and loss) runs in."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
