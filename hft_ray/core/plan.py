"""A selection plan: which units (or, at element granularity, which entries) a stage trains,
what each parameter gets, the trained fractions, and the plan as JSON (selection.json)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from hft_ray.core.roles import TOP_LEVEL, Part, Unit

# What a parameter's plan says: train all of it, none of it, or the entries of a bool mask.
ParamMask = bool | torch.Tensor


def round_half_up(x: float) -> int:
    """Python's round() rounds half to even (round(2.5) == 2); a ratio rule wants 2.5 -> 3."""
    return math.floor(x + 0.5)


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
    # hft_ray/core/importance.py); `importance` holds every unit's score.
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
            by_matrices[name] = sum(t / u.numel for t, u in zip(trained, units, strict=True)) / len(units)
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
    def from_dict(cls, data: Mapping) -> SelectionPlan:
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
