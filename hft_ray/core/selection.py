"""Which half to train: the paper's category-level rule and its generalisations.

`select` is a pure function of (parameter names and shapes, role map, granularity, ratio,
seed, stage): the same inputs give the same plan, bit for bit. Every stage of a continual
pipeline passes its own `stage`, so every stage draws a new plan.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping

import torch

from hft_ray.core.plan import SelectionPlan, element_mask, round_half_up
from hft_ray.core.roles import Geometry, Unit, assign_roles, role_group
from hft_ray.errors import UserError

__all__ = ["GRANULARITIES", "STRATEGIES", "SelectionPlan", "element_mask", "model_units", "plan_units",
           "round_half_up", "select", "validate_selection_args"]

GRANULARITIES = ("category", "layer", "model", "element")
STRATEGIES = ("random", "importance")

def validate_selection_args(granularity: str, ratio: float) -> list[str]:
    """Every problem with the selection arguments, as messages naming the key."""
    problems = []
    if granularity not in GRANULARITIES:
        problems.append(
            f"granularity: {granularity!r} is not a granularity; use one of {', '.join(GRANULARITIES)}"
        )
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        problems.append(f"ratio: {ratio!r} is outside (0, 1); the paper's default is 0.5")
    return problems


def _spread(rng: random.Random, units_by_layer: Mapping[int | None, list[Unit]], ratio: float) -> set[str]:
    """Train round(ratio * total) units of one group, as evenly over layers as rounding allows:
    each layer trains floor(ratio * n_l), and the remainder goes to layers drawn at random.
    Attention (n=4, p=0.5): 2 per layer. FFN (n=3): 1.5 per layer, i.e. 2 in a random half of
    the layers and 1 in the other half. Norms (n=2): 1 per layer."""
    layers = sorted(units_by_layer, key=lambda layer: -1 if layer is None else layer)
    total = sum(len(units_by_layer[layer]) for layer in layers)
    counts = {layer: math.floor(ratio * len(units_by_layer[layer])) for layer in layers}
    remainder = round_half_up(ratio * total) - sum(counts.values())
    room = [layer for layer in layers if counts[layer] < len(units_by_layer[layer])]
    for layer in rng.sample(room, min(remainder, len(room))):
        counts[layer] += 1
    return {u.key for layer in layers for u in rng.sample(units_by_layer[layer], counts[layer])}


def _draw(rng: random.Random, units: list[Unit], ratio: float) -> set[str]:
    return {u.key for u in rng.sample(units, round_half_up(ratio * len(units)))}


# -- the importance strategy: the same structure, the least important units train ------------------

def _least(units: Iterable[Unit], scores: Mapping[str, float]) -> list[Unit]:
    """Units from least to most important (ties by key, so the order is total)."""
    return sorted(units, key=lambda u: (scores[u.key], u.key))


def _spread_least(scores: Mapping[str, float], units_by_layer: Mapping[int | None, list[Unit]],
                  ratio: float) -> set[str]:
    """`_spread`'s counts, but each layer trains its least important units, and the remainder
    goes to the layers whose next candidate is least important."""
    ordered = {layer: _least(units, scores) for layer, units in units_by_layer.items()}
    counts = {layer: math.floor(ratio * len(units)) for layer, units in ordered.items()}
    remainder = round_half_up(ratio * sum(len(units) for units in ordered.values())) - sum(counts.values())
    room = [layer for layer in ordered if counts[layer] < len(ordered[layer])]
    room.sort(key=lambda layer: (scores[ordered[layer][counts[layer]].key], ordered[layer][counts[layer]].key))
    for layer in room[:remainder]:
        counts[layer] += 1
    return {u.key for layer, units in ordered.items() for u in units[:counts[layer]]}


def _layer_importance(units: list[Unit], scores: Mapping[str, float]) -> float:
    """A layer's mean importance per entry."""
    return sum(scores[u.key] * u.numel for u in units) / sum(u.numel for u in units)


def plan_units(
    units: Iterable[Unit],
    model_type: str,
    granularity: str = "category",
    ratio: float = 0.5,
    seed: int = 0,
    stage: int = 0,
    select_embeddings: bool = False,
    period: int = 0,
    scores: Mapping[str, float] | None = None,
) -> SelectionPlan:
    """The selection rule over role-mapped units (see docs/design.md, 'The selection').
    `period` > 0 draws the stage's n-th plan for periodic re-selection within a stage.
    `scores` (unit key -> importance, hft_ray/core/importance.py) replaces the random draw:
    within the same structure, the least important units train and the most important stay
    frozen."""
    problems = validate_selection_args(granularity, ratio)
    if scores is not None and granularity == "element":
        problems.append("strategy: 'importance' ranks whole matrices; use granularity category, layer or model")
    if problems:
        raise UserError(*problems)
    units = tuple(units)
    # A string seed makes random.Random hash it with SHA-512: stable across runs and platforms.
    rng = random.Random(f"hft:{seed}:{stage}:{granularity}:{ratio}" + (f":{period}" if period else ""))
    plan = dict(model_type=model_type, granularity=granularity, ratio=float(ratio), seed=seed,
                stage=stage, select_embeddings=select_embeddings, units=units, period=period,
                strategy="random" if scores is None else "importance",
                importance=None if scores is None else {u.key: float(scores[u.key]) for u in units})
    in_layers = [u for u in units if u.layer is not None]
    top = [u for u in units if u.layer is None]
    always = set() if select_embeddings else {u.key for u in top}
    if granularity == "element":
        return SelectionPlan(**plan, trained=frozenset(always))

    def draw(pool: list[Unit]) -> set[str]:
        if scores is None:
            return _draw(rng, pool, ratio)
        return {u.key for u in _least(pool, scores)[:round_half_up(ratio * len(pool))]}

    trained: set[str] = set(always)
    if granularity == "category":
        trained |= _category(rng, in_layers, ratio, scores)
    elif granularity == "layer":
        trained |= _whole_layers(rng, in_layers, ratio, scores)
    elif granularity == "model":
        pool = in_layers + (top if select_embeddings else [])
        return SelectionPlan(**plan, trained=frozenset(trained | draw(pool)))
    if select_embeddings:
        trained |= draw(top)
    return SelectionPlan(**plan, trained=frozenset(trained))


def _category(rng: random.Random, in_layers: list[Unit], ratio: float, scores: Mapping[str, float] | None) -> set[str]:
    """Per role group (attention, feed-forward, norms), `ratio` of each layer's units, spread."""
    trained: set[str] = set()
    for group in sorted({role_group(u.role) for u in in_layers}):
        by_layer: dict[int | None, list[Unit]] = {}
        for unit in in_layers:
            if role_group(unit.role) == group:
                by_layer.setdefault(unit.layer, []).append(unit)
        trained |= _spread(rng, by_layer, ratio) if scores is None else _spread_least(scores, by_layer, ratio)
    return trained


def _whole_layers(rng: random.Random, in_layers: list[Unit], ratio: float,
                  scores: Mapping[str, float] | None) -> set[str]:
    """`ratio` of the layers, whole: drawn, or the least important ones."""
    layers = sorted({u.layer for u in in_layers})
    count = round_half_up(ratio * len(layers))
    if scores is None:
        chosen = set(rng.sample(layers, count))
    else:
        members = {layer: [u for u in in_layers if u.layer == layer] for layer in layers}
        chosen = set(sorted(layers, key=lambda layer: (_layer_importance(members[layer], scores), layer))[:count])
    return {u.key for u in in_layers if u.layer in chosen}


def model_units(model: torch.nn.Module) -> list[Unit]:
    """The role-mapped units of a transformers model (any device, `meta` included)."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return assign_roles(shapes, model.config.model_type, Geometry.from_config(model.config))


def select(
    model: torch.nn.Module,
    granularity: str = "category",
    ratio: float = 0.5,
    seed: int = 0,
    stage: int = 0,
    select_embeddings: bool = False,
) -> SelectionPlan:
    """The plan for one stage of a transformers causal LM."""
    return plan_units(
        model_units(model), model.config.model_type, granularity, ratio, seed, stage, select_embeddings
    )
