"""Branch jobs from a pipeline: the one place that decides a stage's data (with replay), its
seeds, its method settings and where its checkpoint goes. `hft-ray run` and every Tune trial
build their jobs here, so a trial and the pipeline file made from it train the same thing."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from hft_ray.config.spec import PipelineSpec
from hft_ray.data.batching import Part
from hft_ray.data.loading import DomainData
from hft_ray.storage import Location
from hft_ray.train.job import BranchJob, StageJob, TrainSettings
from hft_ray.train.methods import method_class


class Planner:
    def __init__(self, spec: PipelineSpec, domains: dict[str, DomainData], folder: str | Path | Location):
        self.spec, self.domains, self.folder = spec, domains, Location(folder)

    def branch(self, method: str, first: int, start: str, name: str | None = None) -> BranchJob:
        """`method`'s stages from `first` on, from the checkpoint `start`, as the branch `name`
        (default: the method's name)."""
        stages = tuple(self.stage(method, i) for i in range(first, len(self.spec.stages) + 1))
        threads = max(1, int(self.spec.train.cpus_per_worker))
        return BranchJob(name or method, start, stages, self.settings, threads=threads)

    def pretrain(self, start: str, threads: int, name: str = "pretrain") -> BranchJob:
        """Pretraining the base, as a worker group of its own (the base node of the run's DAG)."""
        return BranchJob(name, start, (self.pretrain_stage(threads),), self.settings, threads=threads)

    def pretrain_stage(self, threads: int) -> StageJob:
        """Full training of the base model on `pretrain.domains`, mixed evenly: stage 0, into
        `base`, with `threads` (it runs before the branches that start from it: the CPUs are free).
        Evenly: each domain's rows repeated up to the largest one's count, so 150 facts are not
        drowned by 2,000 skill examples."""
        pretrain, seed = self.spec.pretrain, self.spec.seed
        size = max(self.domains[name].token_rows for name in pretrain.domains)
        parts = tuple(Part(self._tokens(name), take=size) for name in pretrain.domains)
        return StageJob(0, "pretrain", parts, pretrain.steps, pretrain.lr, seed, str(self.base), threads=threads)

    @property
    def base(self) -> Location:
        return self.folder / "base"

    def stage(self, method: str, index: int) -> StageJob:
        stage, total = self.spec.stages[index - 1], len(self.spec.stages)
        config = self.method_config(method)
        earlier = ()
        if config.get("strategy") == "importance":  # as many rows of each as the measure reads
            rows = config["importance_batches"] * self.spec.train.batch_size
            earlier = tuple(tuple(self.domains[d].train[:rows]) for d in self.spec.earlier_domains(index))
        pairs = tuple(self.domains[stage.domain].train) if stage.kind == "dpo" else ()
        return StageJob(index=index, label=f"{method} stage {index}/{total} ({stage.domain})",
                        parts=() if pairs else self.parts(method, index), pairs=pairs, steps=stage.steps,
                        lr=self.spec.stage_lr(stage), seed=self.spec.seed * 1000 + index,
                        output=str(self.output(method, index)), method=config, loss=stage.kind, beta=stage.beta,
                        earlier=earlier)

    def output(self, method: str, index: int) -> Location:
        return self.folder / method / f"stage-{index}"

    def method_config(self, method: str) -> dict:
        """What the workers need of the method (hft_ray/train/methods): its kind and settings,
        the selection seed filled in; `replay` stays here (it shapes the data)."""
        entry = self.spec.methods[method]
        return method_class(entry.kind).worker_config(entry, self.spec.seed)

    def replay(self, method: str, index: int) -> float:
        """The replayed share of stage `index`'s data: the method's `replay` on an SFT stage that
        has earlier SFT stages to replay, else 0."""
        stages = self.spec.stages
        earlier = any(s.kind == "sft" for s in stages[:index - 1])
        return getattr(self.spec.methods[method], "replay", 0.0) if stages[index - 1].kind == "sft" and earlier else 0.0

    def parts(self, method: str, index: int) -> tuple[Part, ...]:
        """The stage's rows: its domain's; with `replay` f, plus rows of the earlier SFT stages'
        domains making up the share f, spread over them by their sizes (none repeated); for a
        joint method, every stage's domain whole (the same for every stage)."""
        stages = self.spec.stages
        if method_class(self.spec.methods[method].kind).every_stage_data:
            return tuple(Part(self._tokens(d)) for d in dict.fromkeys(s.domain for s in stages if s.kind == "sft"))
        current = Part(self._tokens(stages[index - 1].domain))
        fraction = self.replay(method, index)
        if not fraction:
            return (current,)
        earlier = list(dict.fromkeys(s.domain for s in stages[:index - 1] if s.kind == "sft"))
        sizes = [self.domains[d].token_rows for d in earlier]
        wanted = round(self.domains[stages[index - 1].domain].token_rows * fraction / (1 - fraction))
        takes = [min(size, round(wanted * size / sum(sizes))) for size in sizes]
        return (current,) + tuple(Part(self._tokens(d), take=take, seed=self.spec.seed * 1000 + index * 10 + k)
                                  for k, (d, take) in enumerate(zip(earlier, takes, strict=True)) if take)

    def _tokens(self, domain: str) -> str:
        folder = self.domains[domain].tokens
        if folder is None:
            raise ValueError(f"domains.{domain}: not tokenized; the preflight (hft_ray/config/preflight.py) "
                             "tokenizes every domain a stage trains on")
        return folder

    @cached_property
    def settings(self) -> TrainSettings:
        return TrainSettings.of(self.spec.train, precision=self.spec.precision)
