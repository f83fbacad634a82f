"""The Ray cluster a run uses: join one, or start an embedded one sized for this machine, and
what it can hold."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import ray


@dataclass(frozen=True)
class Capacity:
    cpus: float
    gpus: float
    can_grow: bool             # an autoscaler may add nodes
    where: str                 # "this machine (embedded Ray)" or the address
    custom: dict = field(default_factory=dict)  # custom resources, summed over the nodes
    accelerators: tuple[str, ...] = ()          # the GPU types Ray detected on the nodes (H100, A100, ...)


def init_ray(address: str | None, verbose: bool = False, trials_stop_early: bool = False) -> None:
    """Join `address` (or $RAY_ADDRESS, set inside a Ray Job), or start an embedded Ray sized for
    this machine. Ray's own lines (worker output, checkpoint and report notices) stay in its log
    folder unless `verbose`."""
    if ray.is_initialized():
        return
    # Ray Train's controller looks at its workers every 2 s by default: each worker group's start
    # and end, and each reported checkpoint, wait for that tick. Stages of a few seconds feel it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        # Ray Train watches for node preemption with an actor per worker group; one machine has
        # nothing to preempt, and the actor's process costs a start per branch on a laptop.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # address="local" starts a new instance even when a cluster runs on this machine. Its
        # dashboard (on 127.0.0.1; its processes cost a few seconds of start-up on a laptop) runs
        # when something needs its state API: Ray Train's placement-group cleaner frees the CPUs of
        # a worker group whose controller was killed, as ASHA kills a trial it stops; without the
        # dashboard those CPUs stay held and later trials wait for them for ever. `hft-ray run`
        # kills no controller, so it starts without one (unless --verbose).
        dashboard = ({"dashboard_host": "127.0.0.1"} if verbose or trials_stop_early
                     else {"include_dashboard": False})
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=256 * 1024**2, **dashboard, **quiet)
    if not verbose:
        for name in ("ray.train", "ray.tune", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)


def embedded_capacity() -> Capacity:
    """What an embedded Ray will have: this machine's CPUs and GPUs."""
    import torch

    return Capacity(float(os.cpu_count() or 1), float(torch.cuda.device_count()), False, "this machine (embedded Ray)")


def capacity(address: str | None) -> Capacity:
    """What the cluster has now (Ray started), and whether it can grow."""
    resources = ray.cluster_resources()
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
              and not k.startswith(("node:", "accelerator_type:"))}
    accelerators = tuple(sorted(k.removeprefix("accelerator_type:") for k in resources
                                if k.startswith("accelerator_type:")))
    return Capacity(resources.get("CPU", 0.0), resources.get("GPU", 0.0), _autoscaling(),
                    address or os.environ.get("RAY_ADDRESS") or "this machine (embedded Ray)", custom, accelerators)


def _autoscaling() -> bool:
    """Whether any node type may scale up. Ray keeps this only in its private state API (Ray
    Data reads it the same way); if that moves, assume the cluster can grow (wait, don't refuse)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:
        return True
    if not config or not config.node_group_configs:
        return False
    return any(g.max_count == -1 or g.max_count > g.min_count for g in config.node_group_configs
               if g.resources and g.max_count != 0)


def branch_slots(workers: int, cpus_per_worker: float, use_gpu: bool, have: Capacity) -> int:
    """How many branches train at once: each holds `workers` x (`cpus_per_worker` CPUs, 1 GPU)."""
    if use_gpu:
        return max(1, int(have.gpus // workers))
    return max(1, int(have.cpus // (workers * cpus_per_worker)))


def fit_problems(train, eval_resources: dict[str, float], have: Capacity) -> list[str]:
    """Why one branch (`train`, a TrainSpec), or an evaluator, can never start here: a fixed
    cluster that cannot hold its worker group, or has no node with a custom resource it asks for."""
    if have.can_grow:
        return []
    workers, cpus_per_worker, use_gpu = train.workers, train.cpus_per_worker, train.use_gpu
    needs = [("CPU", workers * cpus_per_worker, have.cpus)] + ([("GPU", workers, have.gpus)] if use_gpu else [])
    problems = [f"train.workers: {workers} worker(s) x {cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''} need "
                f"{need:g} {kind}s per branch; {have.where} has {got:g} and cannot grow (no autoscaler); lower "
                f"train.workers or train.cpus_per_worker, or --address a larger cluster"
                for kind, need, got in needs if need > got]
    asked = [("train.resources_per_worker", name, amount * workers)
             for name, amount in train.resources_per_worker.items()]
    asked += [("eval.resources", name, amount) for name, amount in eval_resources.items()]
    for key, name, need in asked:
        if have.custom.get(name, 0.0) < need:
            problems.append(f"{key}.{name}: needs {need:g} of resource {name!r}; {have.where} has "
                            f"{have.custom.get(name, 0.0):g} and cannot grow; start nodes with "
                            f"`ray start --resources '{{\"{name}\": N}}'` or remove the key")
    return problems
