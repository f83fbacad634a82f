"""A stage's training data and the loss it is trained with: the causal-LM loss on the learnt
tokens (SFT), read from token files a batch at a time, or DPO on preference pairs against the
stage's starting model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hft_ray.data.batching import Pool, step_batches
from hft_ray.data.encoding import batches, pad_id
from hft_ray.train.dpo import dpo_step_loss, encode_pairs, with_reference

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class StageData:
    pool: Pool | None                   # SFT: the stage's rows in their token files
    pairs: dict[str, torch.Tensor] | None  # DPO: the pairs with the reference's log-probabilities (on the CPU)
    loss_fn: LossFn | None              # None: the model's own causal-LM loss

    def steps(self, job, stage, tokenizer, rank: int, world: int, done: int = 0) -> Iterator[list[dict]]:
        """Each optimizer step's micro-batches for this rank (on the CPU), past `done` steps."""
        s = job.settings
        if self.pool is not None:
            yield from step_batches(self.pool, seed=stage.seed, batch_size=s.batch_size,
                                    micro_batch_size=s.micro_batch_size, rank=rank, world=world,
                                    pad_id=pad_id(tokenizer), done=done, max_length=s.max_length, packing=s.packing,
                                    group_by_length=s.group_by_length)
            return
        stream = batches(self.pairs, s.batch_size, stage.seed, rank, world)
        for _ in range(done):
            next(stream)
        for batch in stream:
            micro = s.micro_batch_size or len(batch["chosen_input_ids"])
            rows = len(batch["chosen_input_ids"])
            # Each micro-batch's mean DPO loss weighed by its share of the rank's pairs: their sum is the mean.
            yield [{**{k: v[i:i + micro] for k, v in batch.items()}, "share": (min(rows, i + micro) - i) / rows}
                   for i in range(0, rows, micro)]


def stage_data(stage, job, tokenizer, reference: torch.nn.Module) -> StageData:
    """`reference` is the model the stage starts from (DPO's reference; its log-probabilities
    are computed once, here, so no second model is held during training)."""
    if stage.loss == "dpo":
        pairs = encode_pairs(list(stage.pairs), tokenizer, job.settings.max_length)
        return StageData(None, with_reference(reference, pairs), dpo_step_loss(stage.beta))
    return StageData(Pool(stage.parts), None, None)
