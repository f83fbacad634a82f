"""What a branch's workers are asked to do: plain data, the same under Ray Train, torchrun and
one process. A job round-trips through JSON, so `python -m hft_ray.train JOB.json` runs it
where neither Ray nor the pipeline file's schema is installed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hft_ray.data.batching import Part
from hft_ray.data.domains import Example, Preference


@dataclass(frozen=True)
class TrainSettings:
    """How every stage of a branch trains: the pipeline's `train:` keys of the same names, as the
    preflight validated them (hft_ray/config/spec.py TrainSpec). A key added there and here
    reaches the stage; nothing in between lists it."""

    batch_size: int = 32               # sequences per optimizer step, over every worker
    micro_batch_size: int | None = None  # sequences per forward pass on a worker (None: its whole share)
    max_length: int = 64
    packing: bool = False              # rows concatenated up to max_length (hft_ray/data/batching.py)
    group_by_length: bool = False
    weight_decay: float = 0.0
    log_every: int = 25
    checkpoint_every: int = 0          # steps between resumable checkpoints (0: stage ends only)
    precision: str = "fp32"            # fp32 | bf16 | bf16-mixed (hft_ray/train/precision.py)
    strategy: str = "ddp"              # ddp | fsdp (hft_ray/train/runtime.py)
    gradient_checkpointing: bool = False
    bf16_kahan: bool = True            # precision bf16: AdamW keeps what rounding takes (train/compensated.py)

    @classmethod
    def of(cls, train, **resolved) -> TrainSettings:
        """From a validated `train:` section (any object with these attributes); `resolved`
        overrides the keys the spec resolves elsewhere (precision's default)."""
        return cls(**{f.name: resolved.get(f.name, getattr(train, f.name)) for f in fields(cls)})


@dataclass(frozen=True)
class StageJob:
    index: int                 # the stage's number in the pipeline, 1-based (0: pretraining)
    label: str                 # "hft stage 2/3 (caesar)", for progress lines
    parts: tuple[Part, ...]    # an SFT stage's rows: token folders (hft_ray/data/batching.py)
    steps: int
    lr: float
    seed: int                  # the batch order; seed * 1000 + index in a pipeline
    output: str                # the stage's checkpoint folder: written whole or not at all
    method: dict = field(default_factory=lambda: {"kind": "fft"})  # see hft_ray.train.methods
    loss: str = "sft"          # "sft": causal-LM loss; "dpo": preference pairs against the stage's start
    beta: float = 0.1          # DPO's beta
    earlier: tuple[tuple[Example, ...], ...] = ()  # what the model learnt before (importance-aware HFT)
    pairs: tuple[Preference, ...] = ()  # a DPO stage's preference pairs (few: they travel with the job)
    threads: int = 0           # torch threads on CPU for this stage (0: the branch's)


@dataclass(frozen=True)
class BranchJob:
    """One method's stages, in order, from `start` (a checkpoint folder)."""

    name: str                  # the branch's name ("hft", "hft@1" with several seeds), or "pretrain[@<seed>]"
    start: str
    stages: tuple[StageJob, ...]
    settings: TrainSettings = TrainSettings()
    threads: int = 1           # torch intra-op threads per worker on CPU

    def start_of(self, index: int) -> str:
        """The checkpoint stage `index` starts from: the stage before's, or the branch's start."""
        position = [s.index for s in self.stages].index(index)
        return self.stages[position - 1].output if position else self.start

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BranchJob:
        data = json.loads(text)
        settings = TrainSettings(**data.pop("settings"))
        stages = tuple(StageJob(**{**s, "parts": tuple(Part(**p) for p in s["parts"]),
                                   "pairs": tuple(Preference(**p) for p in s["pairs"]),
                                   "earlier": tuple(tuple(_example(e) for e in part) for part in s["earlier"])})
                       for s in data.pop("stages"))
        return cls(**data, stages=stages, settings=settings)

    @classmethod
    def load(cls, path: str | Path) -> BranchJob:
        return cls.from_json(Path(path).read_text())


def _example(row: dict) -> Example | Preference:
    return Preference(**row) if "chosen" in row else Example(**row)
