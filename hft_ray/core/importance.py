"""Importance-aware selection: how much each unit matters to what the model already knows.

A unit's importance is its diagonal empirical Fisher on earlier domains' data: the squared
gradient of the loss, averaged over a few batches and over the unit's entries,

    importance(u) = 1 / (B * |u|) * sum_b sum_{i in u} (d loss_b / d theta_i)^2.

The `importance` strategy then trains the least important units and freezes the rest, under the
same structure as the random draw (per layer and group at category granularity, whole layers at
layer granularity, any units at model granularity): see `selection.plan_units(scores=...)`.

Plain torch: no Ray, no MLflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch

from hft_ray.core.roles import Unit
from hft_ray.data.domains import Example, Preference


def as_sft_examples(examples: Sequence[Example | Preference]) -> list[Example]:
    """What a domain taught, as prompt -> completion: a preference pair counts as its chosen answer."""
    return [Example(e.prompt, e.chosen) if isinstance(e, Preference) else e for e in examples]


def unit_importance(model: torch.nn.Module, units: Iterable[Unit], batches: Iterable[dict[str, torch.Tensor]],
                    micro_batch_size: int | None = None) -> dict[str, float]:
    """Mean squared gradient per entry of every unit (see the module docstring), on `batches`
    of encoded causal-LM data. Each batch's gradient is accumulated over micro-batches of
    `micro_batch_size` rows (weighted by their learnt tokens: the batch's own gradient), then
    squared and summed into one number per unit, so nothing the size of the model is kept beside
    its gradients. The model runs as it trains (gradient checkpointing included) with its dropout
    at 0. Leaves the model's weights, `requires_grad` flags and mode as they were."""
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    units = list(units)
    sums = dict.fromkeys((u.key for u in units), 0.0)
    count = 0
    try:
        with _without_dropout(model):
            for p in params.values():
                p.requires_grad_(True)
            for batch in batches:
                model.zero_grad(set_to_none=True)
                learnt = _learnt_tokens(batch["labels"])
                rows = len(batch["input_ids"])
                step = micro_batch_size or rows
                for start in range(0, rows, step):
                    part = {k: v[start:start + step] for k, v in batch.items()}
                    (model(**part).loss * (_learnt_tokens(part["labels"]) / learnt)).backward()
                for unit in units:
                    sums[unit.key] += _squared_sum(params, unit)
                count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(flags[name])
    if not count:
        raise ValueError("unit_importance: no batches to measure on")
    return {unit.key: sums[unit.key] / (count * unit.numel) for unit in units}


def _learnt_tokens(labels: torch.Tensor) -> int:
    """The tokens a causal LM's loss averages over (labels shifted by one, -100 ignored)."""
    return max(1, int((labels[:, 1:] != -100).sum()))


def _squared_sum(params: dict[str, torch.nn.Parameter], unit: Unit) -> float:
    total = 0.0
    for part in unit.parts:
        grad = params[part.param].grad
        if grad is None:
            continue
        slices = [grad] if part.dim is None else [grad.narrow(part.dim, a, b - a) for a, b in part.ranges]
        total += sum(float(piece.float().pow(2).sum()) for piece in slices)
    return total


@contextlib.contextmanager
def _without_dropout(model: torch.nn.Module):
    """Train mode, every dropout probability at 0 (modules and the attention's float rate), restored after."""
    was_training = model.training
    saved = [(m, "p", m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved += [(m, "attention_dropout", m.attention_dropout) for m in model.modules()
              if isinstance(getattr(m, "attention_dropout", None), float)]
    for module, name, _ in saved:
        setattr(module, name, 0.0)
    model.train()
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        model.train(was_training)


def measure(model: torch.nn.Module, tokenizer, units: Sequence[Unit],
            earlier: Sequence[Sequence[Example | Preference]], *, batches: int, batch_size: int, max_length: int,
            seed: int, micro_batch_size: int | None = None) -> dict[str, float]:
    """Every unit's importance for `model` as it is, on `batches` batches drawn from the `earlier`
    domains' training data, mixed evenly (on the model's device)."""
    from hft_ray.data.encoding import batches as batch_stream
    from hft_ray.data.encoding import encode
    from hft_ray.data.mixing import mix_balanced

    device = next(model.parameters()).device
    # Rows the preflight kept; those of truncate: left domains cut here as in training.
    encoded = encode(mix_balanced([as_sft_examples(part) for part in earlier]), tokenizer, max_length, truncate="left")
    stream = batch_stream(encoded, batch_size, seed)
    return unit_importance(model, units, ({k: v.to(device) for k, v in next(stream).items()} for _ in range(batches)),
                           micro_batch_size)
