"""Apply a SelectionPlan to a model: freeze whole tensors, mask partly trained ones.

Whole tensors get `requires_grad=False` and stay out of the optimizer. A partly trained
tensor (a fused slice, an element mask) keeps `requires_grad=True`, so two things guard its
frozen entries:
- a gradient hook zeroes their gradient, so clipping and Adam's moments never see it;
- after every optimizer step they are written back from a saved copy, because decoupled
  weight decay (AdamW: p -= lr * wd * p) moves an entry even when its gradient is zero.
Together they keep frozen entries bitwise unchanged through any number of steps.

Freeze before wrapping the model in DDP (Ray Train's `prepare_model`): DDP fixes the set of
parameters it synchronises when it wraps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hft_ray.core.selection import SelectionPlan


class AppliedPlan:
    """A plan in force on a model. `attach(optimizer)` once per optimizer; `remove()` undoes it."""

    def __init__(self, model: torch.nn.Module, plan: SelectionPlan):
        self.model = model
        self.plan = plan
        params = dict(model.named_parameters())
        # Only masked tensors are held (FSDP2 replaces whole ones when it shards: a reference
        # here would keep rank 0's whole unsharded model alive through the stage).
        self._masked: dict[str, torch.nn.Parameter] = {}
        self._frozen_masks: dict[str, torch.Tensor] = {}  # True where an entry is frozen
        self._frozen_values: dict[str, torch.Tensor] = {}
        self._handles: list = []
        for name, mask in plan.param_masks().items():
            param = params[name]
            if isinstance(mask, bool):
                param.requires_grad_(mask)
                continue
            param.requires_grad_(True)
            frozen = ~mask.to(param.device)
            self._masked[name] = param
            self._frozen_masks[name] = frozen
            self._frozen_values[name] = param.detach()[frozen].clone()
            # The hook runs before the gradient is accumulated (and before DDP's all-reduce).
            self._handles.append(param.register_hook(lambda grad, frozen=frozen: grad.masked_fill(frozen, 0)))
        whole = sum(p.numel() for n, p in params.items() if p.requires_grad and n not in self._frozen_masks)
        partial = sum(int((~m).sum()) for m in self._frozen_masks.values())
        self._counts = {"total": sum(p.numel() for p in params.values()), "trainable": whole + partial}

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters to give the optimizer: those with anything left to train."""
        return (p for p in self.model.parameters() if p.requires_grad)

    def trainable_named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Write the saved frozen entries back (undoes weight decay on masked tensors)."""
        for name, frozen in self._frozen_masks.items():
            self._masked[name].masked_scatter_(frozen, self._frozen_values[name])

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore frozen entries after every `optimizer.step()`."""
        if self._frozen_masks:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore_frozen()))

    def remove(self) -> None:
        """Drop hooks and make every parameter trainable again (before applying a new plan)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param in self.model.parameters():
            param.requires_grad_(True)

    def counts(self) -> dict[str, int]:
        """Trainable and total parameter counts as the optimizer sees them."""
        return dict(self._counts)


def apply_plan(model: torch.nn.Module, plan: SelectionPlan) -> AppliedPlan:
    """Freeze what `plan` freezes. Build the optimizer from `.trainable_parameters()` after this."""
    return AppliedPlan(model, plan)


class PeriodicSelection:
    """Periodic re-selection within a stage (LISA-like): every `every` optimizer steps a new
    plan (the same rule, the stage's next draw) replaces the one in force.

    The optimizer must hold every parameter a plan may train: AdamW skips a parameter whose
    gradient is None, so what a period freezes is not touched in that period (whole tensors get
    no gradient; masked entries are zeroed and restored as under one plan)."""

    def __init__(self, model: torch.nn.Module, plan: SelectionPlan, every: int, optimizer, start_step: int = 0):
        self.model, self.plan, self.every, self.optimizer = model, plan, every, optimizer
        self.applied = self._apply(start_step // every)

    def plan_for(self, period: int) -> SelectionPlan:
        from hft_ray.core.selection import plan_units

        p = self.plan
        return plan_units(p.units, p.model_type, p.granularity, p.ratio, p.seed, p.stage, p.select_embeddings,
                          period=period)

    def _apply(self, period: int) -> AppliedPlan:
        applied = apply_plan(self.model, self.plan_for(period))
        applied.attach(self.optimizer)
        return applied

    def after_step(self, step: int) -> None:
        """Call after optimizer step `step` (1-based): at a period's end, draw the next plan."""
        if step % self.every == 0:
            self.applied.remove()
            self.applied = self._apply(step // self.every)
