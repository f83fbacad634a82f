"""HFT inside a plain `transformers.Trainer`: add `HFTCallback(...)` to its callbacks.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[HFTCallback()])

Without re-selection the plan is applied when the Trainer is built, before it creates its
optimizer, so frozen tensors get neither gradients nor optimizer state. With
`reselect_every_epoch=True` the optimizer holds every parameter and each epoch draws a new
plan (stage = epoch index); AdamW skips a parameter whose gradient is None, so frozen tensors
stay untouched there too.
"""

from __future__ import annotations

from transformers import TrainerCallback

from hft_ray.core.freezing import AppliedPlan, apply_plan
from hft_ray.core.selection import SelectionPlan, select, validate_selection_args
from hft_ray.errors import UserError


class HFTCallback(TrainerCallback):
    def __init__(self, granularity: str = "category", ratio: float = 0.5, seed: int = 0,
                 select_embeddings: bool = False, reselect_every_epoch: bool = False):
        problems = validate_selection_args(granularity, ratio)
        if problems:
            raise UserError(*problems)
        self.selection = dict(granularity=granularity, ratio=ratio, seed=seed, select_embeddings=select_embeddings)
        self.reselect_every_epoch = reselect_every_epoch
        self.applied: AppliedPlan | None = None
        self.plans: list[SelectionPlan] = []  # every plan drawn, in order
        self._epoch = 0

    def _apply(self, model, stage: int) -> None:
        if self.applied is not None:
            self.applied.remove()
        plan = select(model, stage=stage, **self.selection)
        self.applied = apply_plan(model, plan)
        self.plans.append(plan)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if not self.reselect_every_epoch:
            self._apply(model, stage=0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.applied is None and not self.reselect_every_epoch:  # added after the Trainer was built
            self._apply(model, stage=0)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self.reselect_every_epoch:
            self._apply(model, stage=self._epoch)
        self._epoch += 1

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Undo weight decay on the frozen entries of partly trained tensors.
        if self.applied is not None:
            self.applied.restore_frozen()
