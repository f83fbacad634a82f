"""The tune space file: what `hft-ray tune` searches, validated like the pipeline file (unknown
keys rejected, every problem named at once), and the pipeline it searches, with `set:` applied."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hft_ray.config.files import parse_yaml, read_yaml, set_override
from hft_ray.config.spec import PipelineSpec, parse_spec
from hft_ray.core.selection import GRANULARITIES, STRATEGIES
from hft_ray.errors import UserError

OBJECTIVE_METRICS = ("OP", "BWT", "forgetting", "heldout_delta", "OP+BWT")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampler(Strict):
    """A sampled key: each trial draws from {choice: [...]}, {uniform: [lo, hi]} or
    {loguniform: [lo, hi]} (exactly one of them)."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_and_ordered(self):
        given = [k for k in ("choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform (got {', '.join(given) or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not 0 < bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: {list(bounds)!r}; need 0 < low < high")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform") if getattr(self, k) is not None)


Granularity = Literal[GRANULARITIES]  # type: ignore[valid-type]

# Which samplers each key takes (a list, i.e. a grid, is always allowed).
_SAMPLERS = {"granularity": ("choice",), "ratio": ("choice", "uniform"), "lr": ("choice", "loguniform"),
             "seed": ("choice",), "select_embeddings": ("choice",), "reselect_every": ("choice",),
             "strategy": ("choice",)}
SEARCHED = tuple(_SAMPLERS)  # the keys a space may search


class Space(Strict):
    """A list is a grid (every value, in every combination); a Sampler is drawn per trial."""

    granularity: list[Granularity] | Sampler = Field(["category"], description="grid list or {choice: [...]}")
    ratio: list[Annotated[float, Field(gt=0, lt=1)]] | Sampler = Field([0.5], description="grid, choice or uniform")
    lr: list[Annotated[float, Field(gt=0)]] | Sampler | None = Field(None, description="default: the pipeline's")
    seed: list[int] | Sampler | None = Field(None, description="selection seed; default: the pipeline's seed")
    select_embeddings: list[bool] | Sampler | None = None
    reselect_every: list[Annotated[int, Field(ge=0)]] | Sampler | None = Field(
        None, description="periodic re-selection: a new plan every N steps (0: one plan per stage)")
    strategy: list[Literal[STRATEGIES]] | Sampler | None = Field(  # type: ignore[valid-type]
        None, description="random (the paper's draw) or importance (freeze what earlier domains need most)")
    seeds: Annotated[int, Field(gt=0)] | Annotated[list[int], Field(min_length=1)] | None = Field(
        None, description="not searched: every trial runs its configuration once per seed (N: the pipeline's "
                          "seed and the N-1 after it; or a list) and Tune ranks trials on the mean")

    @field_validator(*SEARCHED, mode="before")
    @classmethod
    def _scalar_is_one_value(cls, value):
        return value if isinstance(value, (list, dict)) or value is None else [value]

    @field_validator(*SEARCHED)
    @classmethod
    def _sampler_fits(cls, value, info):
        if not isinstance(value, Sampler):
            return value
        allowed = _SAMPLERS[info.field_name]
        if value.kind not in allowed:
            raise ValueError(f"{value.kind}: not for {info.field_name}; use a list (grid) or "
                             f"{' or '.join(allowed)}")
        if value.choice is not None:
            bad = {"granularity": lambda v: v not in GRANULARITIES,
                   "ratio": lambda v: not isinstance(v, (int, float)) or not 0 < v < 1,
                   "lr": lambda v: not isinstance(v, (int, float)) or v <= 0,
                   "seed": lambda v: not isinstance(v, int) or isinstance(v, bool),
                   "select_embeddings": lambda v: not isinstance(v, bool),
                   "reselect_every": lambda v: not isinstance(v, int) or isinstance(v, bool) or v < 0,
                   "strategy": lambda v: v not in STRATEGIES}[info.field_name]
            wrong = [v for v in value.choice if bad(v)]
            if wrong:
                valid = {"granularity": ", ".join(GRANULARITIES), "ratio": "numbers in (0, 1)", "lr": "numbers > 0",
                         "seed": "integers", "select_embeddings": "true or false",
                         "reselect_every": "integers >= 0", "strategy": ", ".join(STRATEGIES)}[info.field_name]
                raise ValueError(f"choice: {wrong!r} not valid; use {valid}")
        if value.uniform is not None and not value.uniform[1] < 1:
            raise ValueError(f"uniform: {list(value.uniform)!r}; a ratio needs 0 < low < high < 1")
        return value

    def seed_list(self, first: int) -> list[int] | None:
        """The seeds every trial runs (`first`: the pipeline's seed), or None for one seed."""
        if self.seeds is None:
            return None
        return list(range(first, first + self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def values(self, key: str) -> list:
        """Every value `key` may take in a trial (a grid's list, a choice's options)."""
        value = getattr(self, key)
        return value if isinstance(value, list) else (value.choice or []) if isinstance(value, Sampler) else []

    @model_validator(mode="after")
    def _importance_combines(self):
        """Importance ranks whole matrices and draws one plan per stage: refuse trials that could
        pair it with element granularity or periodic re-selection."""
        if "importance" in self.values("strategy"):
            if "element" in self.values("granularity"):
                raise ValueError("strategy: 'importance' ranks whole matrices and cannot pair with granularity "
                                 "element; search element in a separate space")
            if any(self.values("reselect_every")):
                raise ValueError("strategy: 'importance' draws one plan per stage and cannot pair with "
                                 "reselect_every > 0; search them in separate spaces")
        return self


class Objective(Strict):
    metric: Literal[OBJECTIVE_METRICS] = Field("OP", description="OP+BWT is OP + bwt_weight * BWT")  # type: ignore[valid-type]
    bwt_weight: float = Field(1.0, ge=0)
    mode: Literal["max", "min"] | None = Field(None, description="default: min for forgetting, else max")

    @property
    def direction(self) -> str:
        return self.mode or ("min" if self.metric == "forgetting" else "max")


class Fifo(Strict):
    kind: Literal["fifo"]


class Asha(Strict):
    kind: Literal["asha"]
    grace_period: int = Field(1, gt=0, description="stages every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class TuneSpace(Strict):
    pipeline: str = Field(description="pipeline file, relative to the space file")
    set: dict[str, Any] = Field({}, description="overrides of the pipeline: key.path -> value")
    space: Space = Space()
    objective: Objective = Objective()
    num_samples: int = Field(1, gt=0, description="times the grid is repeated (sampled keys drawn anew)")
    max_concurrent: int = Field(2, gt=0)
    scheduler: Annotated[Fifo | Asha, Field(discriminator="kind")] = Fifo(kind="fifo")


@dataclass(frozen=True)
class LoadedSpace:
    space: TuneSpace
    pipeline_path: Path
    pipeline_data: dict          # the pipeline after `set:`, methods as written
    spec: PipelineSpec
    text: str                    # the space file as written


def _format_error(error: dict) -> str:
    # Union members show up in `loc` by type name (list[...], Choice, ...): not keys the user wrote.
    loc = [str(p) for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p[:1].isupper()))]
    if loc[:1] == ["scheduler"] and loc[1:2] in (["fifo"], ["asha"]):
        del loc[1]  # the tag of the scheduler union
    key = ".".join(loc) or "(top)"
    if error["type"] == "extra_forbidden":
        return (f"{key}: unknown key; valid keys: pipeline, set, space ({', '.join(SEARCHED)}, seeds), "
                "objective (metric, bwt_weight, mode), num_samples, max_concurrent, "
                "scheduler (kind, grace_period, reduction_factor)")
    if error["type"] == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        # "choice: [...] not valid" from a sampler's check names its own sub-key.
        return f"{key}.{message}" if re.match(r"^\w+: ", message) else f"{key}: {message}"
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    return f"{key}: {error['msg']}{shown}"


def _is_union_noise(error: dict) -> bool:
    """A union reports every member's failure; keep those of the member the user wrote
    (a list where a list was written, a mapping where a mapping was)."""
    member = next((p for p in error["loc"] if isinstance(p, str) and ("[" in p or p[:1].isupper())), None)
    if member is None:
        return False
    written = error.get("input")
    if error["type"] in ("model_type", "dict_type", "model_attributes_type") and isinstance(written, list):
        return True
    return error["type"] == "list_type" and isinstance(written, dict)


def flatten_set(data: Any, prefix: str = "") -> dict[str, Any]:
    """`set:` may be written flat (train.lr: 1e-3) or nested (train: {lr: 1e-3})."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(flatten_set(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def parse_space(data: Any, source: str) -> TuneSpace:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping (pipeline, set, space, objective, num_samples, ...)")
    if isinstance(data.get("scheduler"), str):  # `scheduler: asha` is short for {kind: asha}
        data = {**data, "scheduler": {"kind": data["scheduler"]}}
    try:
        return TuneSpace.model_validate(data)
    except ValidationError as error:
        problems = []
        errors = error.errors()
        for e in errors:
            if e["type"] == "union_tag_invalid":
                problems.append(f"scheduler.kind: {e['input'].get('kind')!r} is not a scheduler; use fifo or asha")
            elif not _is_union_noise(e):
                problems.append(_format_error(e))
        if not problems:
            problems = [_format_error(e) for e in errors]
        # A union reports one error per member; keep each message once.
        raise UserError(*dict.fromkeys(problems)) from None


def load_space(path: str | Path, overrides: list[str] = ()) -> LoadedSpace:
    """The validated space and its pipeline (with `set:` applied); every problem named at once."""
    path = Path(path)
    data, text = read_yaml(path, "space", overrides)
    space = parse_space(data, str(path))
    pipeline_path = (path.parent / space.pipeline).resolve()
    if not pipeline_path.is_file():
        raise UserError(f"pipeline: {space.pipeline!r} does not exist (looked for {pipeline_path}; "
                        "a relative path is relative to the space file)")
    try:
        pipeline_data = parse_yaml(pipeline_path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"pipeline: {pipeline_path} is not valid YAML: {error}") from None
    problems = []
    if isinstance(pipeline_data, dict):
        for key, value in flatten_set(space.set).items():
            try:
                set_override(pipeline_data, f"{key}={json.dumps(value)}")
            except UserError:
                problems.append(f"set.{key}: {value!r} does not name an entry of the pipeline {pipeline_path.name}")
    try:
        spec = parse_spec(pipeline_data, str(pipeline_path))
    except UserError as error:
        problems += [f"pipeline {pipeline_path.name} (after set): {p}" for p in error.problems]
        spec = None
    if spec is not None:
        trained = {s.domain for s in spec.stages}
        if space.objective.metric == "heldout_delta" and set(spec.domains) <= trained:
            problems.append("objective.metric: 'heldout_delta' needs a domain no stage trains; "
                            f"the pipeline trains all of {', '.join(spec.domains)}")
        if space.space.reselect_every is not None and spec.train.workers > 1:
            problems.append(f"space.reselect_every: periodic re-selection runs on one worker; the pipeline has "
                            f"train.workers: {spec.train.workers}; add set: {{train.workers: 1}}")
        if space.space.seeds is not None and (space.space.seed is not None or spec.seeds is not None):
            problems.append("space.seeds: every trial runs these seeds; drop " + (
                "space.seed (a searched selection seed would be the same in every seed)" if space.space.seed
                is not None else "the pipeline's seeds: key (add set: {seeds: null})"))
        if space.objective.metric in ("BWT", "forgetting", "OP+BWT") and len(spec.stages) < 2:
            problems.append(f"objective.metric: {space.objective.metric!r} needs 2 or more stages; "
                            f"the pipeline has {len(spec.stages)}; use OP")
    if problems:
        raise UserError(*problems)
    if space.space.seeds is not None:  # trials, and the best pipeline made from one, run them all
        pipeline_data["seeds"] = space.space.seed_list(spec.seed)
        spec = parse_spec(pipeline_data, str(pipeline_path))
    return LoadedSpace(space, pipeline_path, pipeline_data, spec, text)


def objective_value(objective: Objective, values: dict[str, float]) -> float:
    """The objective from a (partial) matrix's summary. BWT and forgetting are undefined after
    one stage; nothing has been forgotten yet, so they count as 0 there (Tune needs a number
    at every report for ASHA to compare trials)."""
    get = lambda key: values.get(key, 0.0)  # noqa: E731
    if objective.metric == "OP+BWT":
        return get("OP") + objective.bwt_weight * get("BWT")
    return get(objective.metric)
