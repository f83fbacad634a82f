"""A stage's training data as tensors and the loss it is trained with: the causal-LM loss on
the completions (SFT), or DPO on preference pairs against the stage's starting model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hft_ray.data.encoding import encode
from hft_ray.train.dpo import dpo_step_loss, encode_pairs, with_reference

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class StageData:
    tensors: dict[str, torch.Tensor]
    loss_fn: LossFn | None     # None: the model's own causal-LM loss


def stage_data(stage, job, tokenizer, reference: torch.nn.Module, device: torch.device) -> StageData:
    """`reference` is the model the stage starts from (DPO's reference; its log-probabilities
    are computed once, here, so no second model is held during training)."""
    if stage.loss == "dpo":
        pairs = encode_pairs(list(stage.examples), tokenizer, job.max_length)
        tensors = with_reference(reference, {k: v.to(device) for k, v in pairs.items()})
        return StageData(tensors, dpo_step_loss(stage.beta))
    # The preflight dropped the rows without room for their answer, except those of domains that
    # cut their prompts' start (truncate: left): those are cut here, the same way.
    return StageData(encode(list(stage.examples), tokenizer, job.max_length, truncate="left"), None)
