"""Half-Reset, the paper's pilot: put the half a plan selects back to the base model's values
and measure what comes back."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hft_ray.core.selection import SelectionPlan


@torch.no_grad()
def half_reset(model: torch.nn.Module, base_state: Mapping[str, torch.Tensor], plan: SelectionPlan) -> int:
    """Reset every entry `plan` trains to its value in `base_state`; return how many were reset."""
    params = dict(model.named_parameters())
    reset = 0
    for name, mask in plan.param_masks().items():
        if mask is False:
            continue
        param = params[name]
        base = base_state[name].to(device=param.device, dtype=param.dtype)
        if mask is True:
            param.copy_(base)
            reset += param.numel()
        else:
            mask = mask.to(param.device)
            param.copy_(torch.where(mask, base, param))
            reset += int(mask.sum())
    return reset
