"""Which half to train: the paper's category-level rule and its generalisations.

`select` is a pure function of (parameter names and shapes, role map, granularity, ratio,
seed, stage): the same inputs give the same plan, bit for bit. Every stage of a continual
pipeline passes its own `stage`, so every stage draws a new plan.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from hft_ray.errors import UserError
from hft_ray.roles import TOP_LEVEL, Geometry, Part, Unit, assign_roles, role_group

GRANULARITIES = ("category", "layer", "model", "element")
STRATEGIES = ("random", "importance")

# What a parameter's plan says: train all of it, none of it, or the entries of a bool mask.
ParamMask = bool | torch.Tensor


def round_half_up(x: float) -> int:
    """Python's round() rounds half to even (round(2.5) == 2); a ratio rule wants 2.5 -> 3."""
    return math.floor(x + 0.5)


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


@dataclass(frozen=True)
class SelectionPlan:
    """Which units (or, at element granularity, which entries) a stage trains."""

    model_type: str
    granularity: str
    ratio: float
    seed: int
    stage: int
    select_embeddings: bool
    units: tuple[Unit, ...]
    # Keys of the units trained whole. At element granularity, those not under selection.
    trained: frozenset[str] = field(default_factory=frozenset)
    period: int = 0  # periodic re-selection within a stage: the n-th draw of the stage (0: the first)
    # "random": the paper's draw. "importance": the least important units train (see
    # hft_ray/importance.py); `importance` holds every unit's score.
    strategy: str = "random"
    importance: Mapping[str, float] | None = field(default=None, compare=False)

    def is_selectable(self, unit: Unit) -> bool:
        return self.select_embeddings or unit.role not in TOP_LEVEL

    # -- what each parameter gets ------------------------------------------------------------

    def param_masks(self) -> dict[str, ParamMask]:
        """Per parameter: True (train all), False (freeze all) or a bool mask of trained entries."""
        if self.granularity == "element":
            return self._element_masks()
        pieces: dict[str, list[tuple[Part, bool]]] = {}
        for unit in self.units:
            for part in unit.parts:
                pieces.setdefault(part.param, []).append((part, unit.key in self.trained))
        masks: dict[str, ParamMask] = {}
        for name, parts in pieces.items():
            flags = {trained for _, trained in parts}
            if len(flags) == 1:
                masks[name] = flags.pop()
                continue
            mask = torch.zeros(parts[0][0].shape, dtype=torch.bool)
            for part, trained in parts:
                if trained:
                    for start, stop in part.ranges:
                        mask.narrow(part.dim, start, stop - start).fill_(True)
            masks[name] = mask
        return masks

    def _element_masks(self) -> dict[str, ParamMask]:
        shapes = {part.param: part.shape for unit in self.units for part in unit.parts}
        selectable = {p.param for u in self.units if self.is_selectable(u) for p in u.parts}
        return {
            name: element_mask(shape, self.ratio, self._param_seed(name)) if name in selectable else True
            for name, shape in shapes.items()
        }

    def _param_seed(self, name: str) -> int:
        period = f":{self.period}" if self.period else ""
        digest = hashlib.sha256(f"hft:{self.seed}:{self.stage}:{name}{period}".encode()).hexdigest()
        return int(digest[:15], 16)

    # -- reporting -----------------------------------------------------------------------------

    def unit_trained_numel(self, unit: Unit) -> float:
        """Trained entries of a unit. At element granularity every selectable tensor trains
        exactly round(ratio * n) entries; a fused slice gets its share of that, pro rata."""
        if self.granularity != "element" or not self.is_selectable(unit):
            return unit.numel if unit.key in self.trained else 0
        share = 0.0
        for part in unit.parts:
            total = math.prod(part.shape)
            share += part.numel * round_half_up(self.ratio * total) / total
        return share

    def fractions(self) -> dict[str, dict[str, float]]:
        """Trained fraction by matrix count (each unit weighs 1) and by parameter count, over
        the whole model, over the units under selection, and per role. With grouped-query
        attention the two differ: k and v are smaller than q and o."""
        groups: dict[str, list[Unit]] = {"overall": list(self.units)}
        groups["selectable"] = [u for u in self.units if self.is_selectable(u)]
        for unit in self.units:
            groups.setdefault(unit.role, []).append(unit)
        by_matrices, by_params = {}, {}
        for name, units in groups.items():
            if not units:
                continue
            trained = [self.unit_trained_numel(u) for u in units]
            by_matrices[name] = sum(t / u.numel for t, u in zip(trained, units)) / len(units)
            by_params[name] = sum(trained) / sum(u.numel for u in units)
        return {"by_matrices": by_matrices, "by_params": by_params}

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "granularity": self.granularity,
            "ratio": self.ratio,
            "seed": self.seed,
            "stage": self.stage,
            "select_embeddings": self.select_embeddings,
            "period": self.period,
            "strategy": self.strategy,
            **({"importance": dict(sorted(self.importance.items()))} if self.importance else {}),
            "trained": sorted(self.trained),
            "units": [
                {
                    "key": unit.key,
                    "role": unit.role,
                    "layer": unit.layer,
                    "parts": [
                        {"param": p.param, "shape": list(p.shape), "dim": p.dim, "ranges": [list(r) for r in p.ranges]}
                        for p in unit.parts
                    ],
                }
                for unit in self.units
            ],
            "fractions": self.fractions(),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "SelectionPlan":
        units = tuple(
            Unit(
                u["role"],
                u["layer"],
                tuple(
                    Part(p["param"], tuple(p["shape"]), p["dim"], tuple(tuple(r) for r in p["ranges"]))
                    for p in u["parts"]
                ),
            )
            for u in data["units"]
        )
        return cls(
            model_type=data["model_type"],
            granularity=data["granularity"],
            ratio=data["ratio"],
            seed=data["seed"],
            stage=data["stage"],
            select_embeddings=data["select_embeddings"],
            units=units,
            trained=frozenset(data["trained"]),
            period=data.get("period", 0),
            strategy=data.get("strategy", "random"),
            importance=data.get("importance"),
        )


def element_mask(shape: tuple[int, ...], ratio: float, seed: int) -> torch.Tensor:
    """Exactly round(ratio * n) trained entries, at positions drawn from `seed`."""
    numel = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[: round_half_up(ratio * numel)]] = True
    return mask.view(shape)


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
    """The selection rule over role-mapped units (see shared/DESIGN.md, 'The selection').
    `period` > 0 draws the stage's n-th plan for periodic re-selection within a stage.
    `scores` (unit key -> importance, hft_ray/importance.py) replaces the random draw: within the
    same structure, the least important units train and the most important stay frozen."""
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
        for group in sorted({role_group(u.role) for u in in_layers}):
            by_layer: dict[int | None, list[Unit]] = {}
            for unit in in_layers:
                if role_group(unit.role) == group:
                    by_layer.setdefault(unit.layer, []).append(unit)
            trained |= _spread(rng, by_layer, ratio) if scores is None else _spread_least(scores, by_layer, ratio)
    elif granularity == "layer":
        layers = sorted({u.layer for u in in_layers})
        count = round_half_up(ratio * len(layers))
        if scores is None:
            chosen = set(rng.sample(layers, count))
        else:
            members = {layer: [u for u in in_layers if u.layer == layer] for layer in layers}
            chosen = set(sorted(layers, key=lambda layer: (_layer_importance(members[layer], scores), layer))[:count])
        trained |= {u.key for u in in_layers if u.layer in chosen}
    elif granularity == "model":
        pool = in_layers + (top if select_embeddings else [])
        return SelectionPlan(**plan, trained=frozenset(trained | draw(pool)))
    if select_embeddings:
        trained |= draw(top)
    return SelectionPlan(**plan, trained=frozenset(trained))


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
