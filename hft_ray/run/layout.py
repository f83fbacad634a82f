"""A run's nodes: its bases, and its branches (one per method and seed), each with the planner
that makes its jobs and the folder its checkpoints go to.

    one seed:      base/          <method>/stage-<i>/                 branches named <method>
    several seeds: seed-<s>/base/ seed-<s>/<method>/stage-<i>/        branches named <method>@<s>

With several seeds, a model built here (built-in) or pretrained here has a base per seed (its
initialisation and its pretraining data order are part of what varies); a real model's base is
shared, loaded and evaluated once. The domains' data is the same for every seed, so the seeds of
two methods are paired (same selection seed, same data order) and can be compared seed by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from hft_ray.config.spec import PipelineSpec
from hft_ray.data.loading import DomainData
from hft_ray.run.planner import Planner
from hft_ray.storage import Location
from hft_ray.train.job import BranchJob
from hft_ray.train.models import resolve_source

SHARED = ""  # the key of the one base every branch starts from


@dataclass(frozen=True)
class BranchNode:
    name: str     # as events, the manifest and MLflow know it
    method: str
    seed: int
    base: str     # the key of the base it starts from


@dataclass(frozen=True)
class BaseNode:
    key: str      # SHARED, or "seed-<s>"
    seed: int
    folder: Location  # it is written to folder/base (from folder/init when it is pretrained)

    @property
    def job_name(self) -> str:
        """The name of the worker group that pretrains it."""
        return f"pretrain@{self.seed}" if self.key else "pretrain"


class Layout:
    def __init__(self, spec: PipelineSpec, domains: dict[str, DomainData], folder: Location):
        self.spec, self.folder = spec, Location(folder)
        self.seeds = spec.run_seeds
        self.several = len(self.seeds) > 1
        self.planners = {seed: Planner(spec.for_seed(seed), domains, self.seed_folder(seed)) for seed in self.seeds}
        own = self.several and (spec.pretrain is not None or resolve_source(spec.model.source).is_builtin)
        self.bases = {base.key: base for base in (
            [BaseNode(f"seed-{s}", s, self.seed_folder(s)) for s in self.seeds] if own
            else [BaseNode(SHARED, self.seeds[0], self.folder)])}
        self.branches = {
            self.branch_name(method, seed): BranchNode(self.branch_name(method, seed), method, seed,
                                                       f"seed-{seed}" if own else SHARED)
            for seed in self.seeds for method in spec.methods}

    def seed_folder(self, seed: int) -> Location:
        return self.folder / f"seed-{seed}" if self.several else self.folder

    def branch_name(self, method: str, seed: int) -> str:
        return f"{method}@{seed}" if self.several else method

    def planner(self, branch: str) -> Planner:
        return self.planners[self.branches[branch].seed]

    def job(self, branch: str, first: int, start: str) -> BranchJob:
        """The branch's worker-group job: its method's stages from `first` on, from `start`."""
        node = self.branches[branch]
        return self.planners[node.seed].branch(node.method, first, start, node.name)

    def method(self, branch: str) -> str:
        return self.branches[branch].method

    def base_of_job(self, job_name: str) -> BaseNode:
        return next(base for base in self.bases.values() if base.job_name == job_name)
