"""The scheduler's actions carried out on Ray, and what comes back turned into events:

- `launch(job)`: a thread of this process fits the branch's TorchTrainer (hft_ray/run/ray_worker.py);
- `evaluate(action)`: a warm `Evaluator` actor scores a checkpoint on every domain;
- `events()`: the workers' events (through an `EventBox` actor), evaluations as they finish,
  and the end or failure of every branch.

The actors (`Services`) are started once per driver: a pipeline run's runner, or every Tune
trial's, shares them; each runner reads its own queue of the box.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

from hft_ray.config.preflight import Prepared
from hft_ray.data.domains import Example, Preference
from hft_ray.run.ray_worker import Scaling, fit_branch, innermost_message
from hft_ray.run.scheduler import BaseEvaluated, BranchEnded, BranchFailed, Evaluate, StageEvaluated
from hft_ray.train.harness import HarnessColumn
from hft_ray.train.job import BranchJob


class RunFailure(RuntimeError):
    """A stage, an evaluation or a branch failed at run time (exit code 1)."""


@ray.remote(num_cpus=0)
class EventBox:
    """Where the branches' rank-0 workers, and the threads that fit them, leave events for the
    driver, one queue per runner. Events from one sender arrive in the order sent (Ray runs one
    caller's actor calls in order)."""

    def __init__(self):
        self.queues: dict[str, asyncio.Queue] = defaultdict(asyncio.Queue)

    async def put(self, key: str, event) -> None:
        self.queues[key].put_nowait(event)

    async def take(self, key: str) -> list:
        """Every event there is for `key`, waiting for the first."""
        queue = self.queues[key]
        events = [await queue.get()]
        while not queue.empty():
            events.append(queue.get_nowait())
        return events


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int
    batch_size: int
    use_gpu: bool
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per evaluator
    harness: dict[str, HarnessColumn] = field(default_factory=dict)  # columns lm-evaluation-harness scores

    @classmethod
    def of(cls, prepared: Prepared) -> EvalSettings:
        """As a prepared pipeline asks."""
        spec = prepared.spec
        return cls(spec.eval.max_new_tokens, spec.eval.batch_size, spec.train.use_gpu, dict(spec.eval.resources),
                   prepared.harness)


@dataclass(frozen=True)
class Evaluation:
    row: dict[str, dict[str, float]]   # domain -> metric -> score (every name of hft_ray/core/scores.py)
    node: str                          # the Ray node that evaluated it
    reports: dict[str, dict]           # harness column -> lm-evaluation-harness's whole result


def evaluate_checkpoint(checkpoint: str, eval_sets: dict[str, list[Example | Preference]],
                        settings: EvalSettings) -> tuple[dict[str, dict[str, float]], dict[str, dict]]:
    """The checkpoint's row (its scores on every domain), and the harness's reports."""
    import torch

    from hft_ray.core.scores import filled
    from hft_ray.train.checkpoints import load_checkpoint
    from hft_ray.train.evaluation import evaluate_domain
    from hft_ray.train.harness import evaluate_harness

    torch.manual_seed(0)
    # bf16 on GPUs (half the memory; generation and scores barely move), float32 on the CPU.
    model, tokenizer = load_checkpoint(checkpoint, torch.bfloat16 if settings.use_gpu else None)
    if settings.use_gpu:
        model.to("cuda")
    row = {name: evaluate_domain(model, tokenizer, examples, max_new_tokens=settings.max_new_tokens,
                                 batch_size=settings.batch_size)
           for name, examples in eval_sets.items()}
    reports = {}
    for name, column in settings.harness.items():
        score, reports[name] = evaluate_harness(model, tokenizer, column, settings.batch_size)
        # Its one score fills every cell kind, as reward accuracy does for a preference domain.
        row[name] = filled(score, **{column.metric: score})
    return row, reports


def evaluate_here(checkpoint: str, eval_sets: dict, settings: EvalSettings) -> Evaluation:
    row, reports = evaluate_checkpoint(checkpoint, eval_sets, settings)
    return Evaluation(row, ray.get_runtime_context().get_node_id(), reports)


class Evaluator:
    """Evaluates checkpoints one after another in a process that stays warm (torch and
    transformers imported once)."""

    def __init__(self, eval_sets: dict[str, list[Example | Preference]], settings: EvalSettings):
        import torch

        from hft_ray.core.scores import rouge_l

        torch.set_num_threads(1)
        rouge_l("", "")  # rouge-score imports nltk (seconds): here, while the driver sets up
        self.eval_sets, self.settings = eval_sets, settings

    def evaluate(self, checkpoint: str) -> Evaluation:
        return evaluate_here(checkpoint, self.eval_sets, self.settings)


@dataclass
class Services:
    """The actors every runner of a driver shares. On CPUs, `count` evaluators reserve no CPU:
    they run beside the branches that hold the CPUs (one thread each), so a stage's row comes
    while the next stage trains. On GPUs an evaluation is a task holding a GPU while it runs
    (an actor would hold one for good)."""

    box: object
    evaluators: list
    eval_sets: object          # an ObjectRef of {domain: examples}
    settings: EvalSettings

    @classmethod
    def start(cls, eval_sets: dict, settings: EvalSettings, count: int) -> Services:
        evaluators = [] if settings.use_gpu else [
            ray.remote(num_cpus=0, resources=settings.resources)(Evaluator).remote(eval_sets, settings)
            for _ in range(count)]
        return cls(EventBox.remote(), evaluators, ray.put(eval_sets), settings)

    def close(self) -> None:
        for actor in [self.box, *self.evaluators]:
            ray.kill(actor)


class RayRunner:
    def __init__(self, services: Services, key: str, storage: str, scaling: Scaling):
        self.services, self.key, self.storage, self.scaling = services, key, storage, scaling
        self.taking = services.box.take.remote(key)
        self.fits: dict[str, threading.Thread] = {}
        self.evaluations: dict[ray.ObjectRef, tuple[Evaluate, int | None]] = {}
        self.queued = [0] * len(services.evaluators)  # this runner's evaluations on each evaluator
        self.offset = zlib.crc32(key.encode())       # runners sharing evaluators start apart
        self.running: set[str] = set()               # branches whose end has not come through the box

    def launch(self, job: BranchJob, run_name: str, scaling: Scaling | None = None) -> None:
        fit = threading.Thread(target=fit_branch, name=f"fit {job.name}", daemon=True,
                               args=(job, self.services.box, self.key, self.storage, run_name, scaling or self.scaling))
        fit.start()
        self.fits[job.name] = fit
        self.running.add(job.name)

    def evaluate(self, action: Evaluate) -> None:
        """On the evaluator with the fewest of this runner's evaluations queued (GPUs: a task)."""
        s = self.services
        if not s.evaluators:
            task = ray.remote(num_cpus=0, num_gpus=1, resources=s.settings.resources)(evaluate_here)
            self.evaluations[task.remote(action.checkpoint, s.eval_sets, s.settings)] = (action, None)
            return
        count = len(s.evaluators)
        which = min(range(count), key=lambda i: (self.queued[i], (i - self.offset) % count))
        self.queued[which] += 1
        self.evaluations[s.evaluators[which].evaluate.remote(action.checkpoint)] = (action, which)

    def events(self) -> Iterator[object]:
        """Until every launched branch has ended and every evaluation is back; `launch` and
        `evaluate` may be called between events."""
        while self.running or self.evaluations:
            ready, _ = ray.wait([self.taking, *self.evaluations], num_returns=1)
            if ready[0] in self.evaluations:
                yield self._evaluated(ready[0])
                continue
            events = ray.get(self.taking)
            self.taking = self.services.box.take.remote(self.key)
            ended = {e.branch for e in events if isinstance(e, (BranchEnded, BranchFailed))}
            self.running -= ended
            for name in ended:
                self.fits.pop(name).join()
            yield from events

    def _evaluated(self, ref) -> BaseEvaluated | StageEvaluated:
        action, which = self.evaluations.pop(ref)
        if which is not None:
            self.queued[which] -= 1
        try:
            done = ray.get(ref)
        except ray.exceptions.RayError as error:
            what = "base evaluation" if action.branch is None else f"{action.branch} stage {action.stage} evaluation"
            raise RunFailure(f"{what} failed: {innermost_message(error)}") from None
        if action.branch is None:
            return BaseEvaluated(done.row, done.node, done.reports, action.base)
        return StageEvaluated(action.branch, action.stage, done.row, done.node, done.reports)
