"""The optimizer and the step loop of a stage: plain torch, no Ray, no MLflow.

The branch train function (hft_ray/train/stage.py) and the benchmarks call the same
`run_steps`, so what is measured outside Ray is what runs inside it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from hft_ray.core.freezing import apply_plan
from hft_ray.core.selection import SelectionPlan
from hft_ray.data.encoding import batches
from hft_ray.train.compensated import KahanAdamW


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the stage stops before writing a broken checkpoint."""


def make_optimizer(params, lr: float, weight_decay: float, steps: int, warmup_fraction: float = 0.05,
                   kahan: bool = False):
    """AdamW with linear warm-up then cosine decay to a tenth of `lr`; with `kahan`, the AdamW
    that keeps what bf16 rounds away from each update (hft_ray/train/compensated.py)."""
    optimizer = (KahanAdamW if kahan else torch.optim.AdamW)(list(params), lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_steps(model: torch.nn.Module, optimizer, scheduler, data: Iterator[dict | list[dict]],
              steps: int, grad_clip: float = 1.0,
              on_step: Callable[[int, float], None] | None = None, start: int = 0,
              loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
              forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
              reduce: Callable[[float], float] = float) -> list[float]:
    """Optimizer steps `start`+1 .. `steps` (`data` and `scheduler` already past `start`);
    returns the loss of each. Each item of `data` is a step's batch, or its micro-batches, whose
    gradients accumulate (synchronised across ranks at the last only) before the one optimizer
    step; each micro-batch's loss is its part of the step's (hft_ray/data/batching.py), and
    `reduce` makes the rank's sum the step's loss (the mean over ranks). `loss_fn(model, batch)`
    defaults to the model's causal-LM loss (SFT); it runs in `forward_context()` (bf16 autocast
    under mixed precision). Raises NonFiniteLoss on NaN/inf."""
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    for step in range(start + 1, steps + 1):
        micro_batches = next(data)
        micro_batches = [micro_batches] if isinstance(micro_batches, dict) else micro_batches
        total = 0.0
        for position, batch in enumerate(micro_batches):
            with gradient_sync(model, position == len(micro_batches) - 1):
                with forward_context():
                    loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"loss is {loss.item()} at step {step}; lower train.lr or check the data")
                loss.backward()
            total += loss.item()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(reduce(total))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool):
    """Gradients reduced across ranks in this backward pass only if `sync` (the last micro-batch
    of a step): DDP's no_sync, FSDP2's requires_gradient_sync; nothing to do alone."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def train(model: torch.nn.Module, encoded: dict[str, torch.Tensor], *, steps: int, lr: float,
          batch_size: int, plan: SelectionPlan | None = None, weight_decay: float = 0.0, seed: int = 0,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """One stage in this process: FFT when `plan` is None, else HFT under `plan`."""
    applied = apply_plan(model, plan) if plan is not None else None
    params = applied.trainable_parameters() if applied else model.parameters()
    optimizer, scheduler = make_optimizer(params, lr, weight_decay, steps)
    if applied:
        applied.attach(optimizer)
    try:
        return run_steps(model, optimizer, scheduler, batches(encoded, batch_size, seed), steps, on_step=on_step)
    finally:
        if applied:
            applied.remove()
