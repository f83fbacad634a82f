"""Branch jobs from a pipeline: the one place that decides a stage's data (with replay), its
seeds, its method settings and where its checkpoint goes. `hft-ray run` and every Tune trial
build their jobs here, so a trial and the pipeline file made from it train the same thing."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from hft_ray.config.spec import PipelineSpec
from hft_ray.data.loading import DomainData
from hft_ray.data.mixing import mix_balanced, mix_replay
from hft_ray.storage import Location
from hft_ray.train.job import BranchJob, StageJob


class Planner:
    def __init__(self, spec: PipelineSpec, domains: dict[str, DomainData], folder: str | Path | Location):
        self.spec, self.domains, self.folder = spec, domains, Location(folder)

    def branch(self, method: str, first: int, start: str, wait_for_start: bool = False,
               pretrain_threads: int = 1) -> BranchJob:
        """`method`'s stages from `first` on (0: pretraining the base first), from the checkpoint
        `start` (which another branch may still be pretraining: `wait_for_start`)."""
        stages = tuple(self.stage(method, i) for i in range(max(1, first), len(self.spec.stages) + 1))
        if first == 0:
            stages = (self.pretrain_stage(pretrain_threads),) + stages
        return BranchJob(method, start, stages, **self._settings(),
                         threads=max(1, int(self.spec.train.cpus_per_worker)), wait_for_start=wait_for_start)

    def pretrain(self, start: str, threads: int) -> BranchJob:
        """Pretraining alone, as a branch of its own (a Tune search makes its base so)."""
        return BranchJob("pretrain", start, (self.pretrain_stage(threads),), **self._settings(), threads=threads)

    def pretrain_stage(self, threads: int) -> StageJob:
        """Full training of the base model on `pretrain.domains`, mixed evenly: stage 0, into
        `base`, with `threads` (it runs before the other branches train: the CPUs are free)."""
        pretrain, seed = self.spec.pretrain, self.spec.seed
        examples = tuple(mix_balanced([self.domains[name].train for name in pretrain.domains]))
        return StageJob(0, "pretrain", examples, pretrain.steps, pretrain.lr, seed, str(self.base), threads=threads)

    @property
    def base(self) -> Location:
        return self.folder / "base"

    def stage(self, method: str, index: int) -> StageJob:
        stage, total = self.spec.stages[index - 1], len(self.spec.stages)
        config = self.method_config(method)
        earlier = ()
        if config.get("strategy") == "importance":
            earlier = tuple(tuple(self.domains[d].train) for d in self.spec.earlier_domains(index))
        return StageJob(index=index, label=f"{method} stage {index}/{total} ({stage.domain})",
                        examples=tuple(self.examples(method, index)), steps=stage.steps,
                        lr=self.spec.stage_lr(stage), seed=self.spec.seed * 1000 + index,
                        output=str(self.output(method, index)), method=config, loss=stage.kind, beta=stage.beta,
                        earlier=earlier)

    def output(self, method: str, index: int) -> Location:
        return self.folder / method / f"stage-{index}"

    def method_config(self, method: str) -> dict:
        """What the workers need of the method (hft_ray/train/methods): its kind and settings,
        the selection seed filled in; `replay` stays here (it shapes the data)."""
        config = self.spec.methods[method].model_dump(exclude={"replay"})
        if config["kind"] == "hft" and config["seed"] is None:
            config["seed"] = self.spec.seed
        return config

    def replay(self, method: str, index: int) -> float:
        """The replayed share of stage `index`'s data: the method's `replay` on an SFT stage that
        has earlier SFT stages to replay, else 0."""
        stages = self.spec.stages
        earlier = any(s.kind == "sft" for s in stages[:index - 1])
        return getattr(self.spec.methods[method], "replay", 0.0) if stages[index - 1].kind == "sft" and earlier else 0.0

    def examples(self, method: str, index: int):
        """The stage's training data; with `replay`, mixed with earlier SFT stages' data; for a
        joint method, all the stages' data mixed evenly (the same for every stage)."""
        stage = self.spec.stages[index - 1]
        if self.spec.methods[method].kind == "joint":
            return self._joint_examples
        current = self.domains[stage.domain].train
        fraction = self.replay(method, index)
        if not fraction:
            return current
        earlier = [self.domains[s.domain].train for s in self.spec.stages[:index - 1] if s.kind == "sft"]
        return mix_replay(current, earlier, fraction, self.spec.seed * 1000 + index)

    @cached_property
    def _joint_examples(self) -> tuple:
        """Every stage's domain once, mixed evenly: what each stage of a joint branch trains on."""
        domains = dict.fromkeys(stage.domain for stage in self.spec.stages)
        return tuple(mix_balanced([self.domains[d].train for d in domains]))

    def _settings(self) -> dict:
        t = self.spec.train
        return {"batch_size": t.batch_size, "max_length": t.max_length, "weight_decay": t.weight_decay,
                "log_every": t.log_every, "checkpoint_every": t.checkpoint_every, "precision": self.spec.precision,
                "strategy": t.strategy, "gradient_checkpointing": t.gradient_checkpointing}
