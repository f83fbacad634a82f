"""Half Fine-Tuning: the stage's selection plan trains half of the model and freezes the rest
(hft_ray/core). With `strategy: importance` the plan freezes what earlier domains need most,
measured on the model that starts the stage; with `reselect_every: K` a new plan replaces the
one in force every K steps (LISA-like, one worker)."""

from __future__ import annotations

import torch

from hft_ray.core.freezing import AppliedPlan, PeriodicSelection, apply_plan
from hft_ray.core.importance import measure
from hft_ray.core.memory import trained_params
from hft_ray.core.selection import SelectionPlan, model_units, plan_units, select
from hft_ray.train.methods.base import Method


class HalfFineTuning(Method):
    kind = "hft"
    trains_everything = False

    @classmethod
    def trained_params(cls, model, entry) -> int:
        return trained_params(model, cls._first_plan(model, entry).param_masks())

    @classmethod
    def fsdp_problems(cls, model, entry, key: str) -> list[str]:
        """What FSDP2 cannot shard: gradient masks (element granularity, slices of fused tensors),
        plans that change within a stage."""
        problems = []
        if entry.reselect_every:
            problems.append(f"{key}.reselect_every: periodic re-selection cannot run with train.strategy: fsdp; "
                            "set reselect_every: 0 or train.strategy: ddp")
        masks = cls._first_plan(model, entry).param_masks()
        partial = sorted(n for n, m in masks.items() if not isinstance(m, bool))
        if partial:
            why = ("trains a share of every tensor" if entry.granularity == "element" else
                   f"trains slices of fused tensors ({', '.join(partial[:2])}{', ...' if len(partial) > 2 else ''})")
            problems.append(f"{key}.granularity: {entry.granularity!r} {why} through gradient masks, which FSDP2's "
                            "shards do not carry; use granularity layer (or category, model on a model without "
                            "fused projections), or train.strategy: ddp")
        return problems

    @classmethod
    def worker_config(cls, entry, seed: int) -> dict:
        config = super().worker_config(entry, seed)
        if config["seed"] is None:  # the pipeline's seed draws the plans
            config["seed"] = seed
        return config

    @staticmethod
    def _first_plan(model, entry) -> SelectionPlan:
        """Stage 1's plan under seed 0: what the driver's checks read (every draw has its shape)."""
        return select(model, entry.granularity, entry.ratio, 0, 1, entry.select_embeddings)

    def __init__(self, config: dict, stage, job):
        self.config, self.stage, self.job = config, stage, job
        self.plan: SelectionPlan | None = None
        self.applied: AppliedPlan | None = None
        self.periodic: PeriodicSelection | None = None

    def prepare(self, model, tokenizer, runtime):
        self.plan = plan_units(model_units(model), model.config.model_type, self.config["granularity"],
                               self.config["ratio"], self.config["seed"], self.stage.index,
                               self.config.get("select_embeddings", False),
                               scores=self._scores(model, tokenizer, runtime))
        self.model = model
        # Freeze before DDP wraps the model: DDP fixes the parameters it synchronises when it wraps.
        self.applied = apply_plan(model, self.plan)
        return model

    def _scores(self, model, tokenizer, runtime) -> dict[str, float] | None:
        """Importance on the earlier domains' data (rank 0 measures, every rank gets its plan)."""
        if self.config.get("strategy", "random") != "importance" or not self.stage.earlier:
            return None
        scores = None
        if runtime.rank == 0:
            # Under fsdp rank 0 holds the whole model on the host until it is sharded: it scores on its device.
            held_on = next(model.parameters()).device
            scores = measure(model.to(runtime.device), tokenizer, model_units(model), self.stage.earlier,
                             batches=self.config.get("importance_batches", 4), batch_size=self.job.settings.batch_size,
                             max_length=self.job.settings.max_length, seed=self.stage.seed,
                             micro_batch_size=self.job.settings.micro_batch_size)
            model.to(held_on)
        return runtime.broadcast(scores)

    def parameters(self, model) -> list[torch.nn.Parameter]:
        # Periodic re-selection: the optimizer holds every parameter, and AdamW skips those a
        # period freezes (their gradient is None).
        return list(model.parameters()) if self.config.get("reselect_every") else super().parameters(model)

    def attach(self, optimizer, start_step: int) -> None:
        every = self.config.get("reselect_every", 0)
        if every:
            self.applied.remove()
            self.periodic = PeriodicSelection(self.model, self.plan, every, optimizer, start_step=start_step)
        else:
            self.applied.attach(optimizer)

    def after_step(self, step: int) -> None:
        if self.periodic is not None and step < self.stage.steps:
            self.periodic.after_step(step)

    def finish(self, model):
        (self.periodic.applied if self.periodic else self.applied).remove()
        return model

    def describe(self) -> dict:
        every = self.config.get("reselect_every", 0)
        return {"kind": "hft", **self.plan.to_dict(), **({"reselect_every": every} if every else {})}

    def counts(self, model) -> dict[str, int]:
        return self.applied.counts()
