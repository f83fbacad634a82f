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

from collections.abc import Iterable, Sequence

import torch

from hft_ray.core.roles import Unit
from hft_ray.data.domains import Example, Preference


def as_sft_examples(examples: Sequence[Example | Preference]) -> list[Example]:
    """What a domain taught, as prompt -> completion: a preference pair counts as its chosen answer."""
    return [Example(e.prompt, e.chosen) if isinstance(e, Preference) else e for e in examples]


def unit_importance(model: torch.nn.Module, units: Iterable[Unit],
                    batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean squared gradient per entry of every unit (see the module docstring), on `batches`
    of encoded causal-LM data. Leaves the model's weights and `requires_grad` flags as they were."""
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    squared = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    squared[name] += p.grad.detach().float() ** 2
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(flags[name])
        model.train(was_training)
    if not count:
        raise ValueError("unit_importance: no batches to measure on")
    scores = {}
    for unit in units:
        total = 0.0
        for part in unit.parts:
            values = squared[part.param]
            if part.dim is None:
                total += float(values.sum())
            else:
                total += sum(float(values.narrow(part.dim, start, stop - start).sum()) for start, stop in part.ranges)
        scores[unit.key] = total / (count * unit.numel)
    return scores


def measure(model: torch.nn.Module, tokenizer, units: Sequence[Unit],
            earlier: Sequence[Sequence[Example | Preference]], *, batches: int, batch_size: int, max_length: int,
            seed: int) -> dict[str, float]:
    """Every unit's importance for `model` as it is, on `batches` batches drawn from the `earlier`
    domains' training data, mixed evenly (on the model's device)."""
    from hft_ray.data.encoding import batches as batch_stream
    from hft_ray.data.encoding import encode
    from hft_ray.data.mixing import mix_balanced

    device = next(model.parameters()).device
    # Rows the preflight kept; those of truncate: left domains cut here as in training.
    encoded = encode(mix_balanced([as_sft_examples(part) for part in earlier]), tokenizer, max_length, truncate="left")
    stream = batch_stream(encoded, batch_size, seed)
    return unit_importance(model, units, ({k: v.to(device) for k, v in next(stream).items()} for _ in range(batches)))
