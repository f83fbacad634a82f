"""The pipeline file: a validated schema (unknown keys rejected, every problem named at once)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from hft_ray.config.cross_checks import cross_problems
from hft_ray.config.files import read_yaml
from hft_ray.config.model_defaults import fill_model_defaults
from hft_ray.config.sources import DatasetSource, FileSource, HarnessSource, ModelSpec, Strict
from hft_ray.core.scores import DEFAULT as DEFAULT_METRIC
from hft_ray.core.scores import NAMES as METRIC_NAMES
from hft_ray.core.selection import GRANULARITIES, STRATEGIES
from hft_ray.errors import UserError
from hft_ray.storage import credentials_in


class PretrainSpec(Strict):
    """Give a built-in model base knowledge before the fine-tuning stages (full training)."""

    domains: list[str] = Field(min_length=1)
    steps: int = Field(gt=0)
    lr: float = Field(3e-3, gt=0)


class DomainSpec(Strict):
    source: str | FileSource | DatasetSource | HarnessSource = Field(
        description="builtin:<kind>, {path: ...}, {dataset: ...} or {harness: TASK, ...}")
    format: Literal["auto", "prompt_completion", "chat", "preference"] = "auto"
    eval_size: int = Field(200, gt=0, description="held-out examples (knowledge domains evaluate on what they train)")
    train_size: int | None = Field(None, gt=0)
    knowledge: bool = Field(False, description="facts to learn by heart: evaluate on the rows it trains "
                                               "(no held-out split), as builtin:facts and builtin:world-facts are")
    match: Literal["exact", "word"] | None = Field(
        None, description="exact: the greedy answer equals the completion; word: it holds the completion as a "
                          "whole word (real chat models answer in sentences). Default: the built-in's, else exact")
    metric: Literal[METRIC_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="the score of this domain's column (hft_ray/core/scores.py). Default: eval.metric; "
                          "word_match instead of exact_match where match is word (world-facts)")
    chat: Literal["auto"] | bool = Field(
        "auto", description="train and ask in the tokenizer's own chat template (a prompt/completion row becomes "
                            "one user and one assistant turn); auto: when the tokenizer has a template")
    train_on: Literal["assistant", "last"] = Field(
        "assistant", description="the learnt tokens of a chat row: every assistant turn, or the last one only")
    truncate: Literal["none", "left"] = Field(
        "none", description="a row whose prompt leaves no room for its answer within train.max_length: dropped "
                            "(none), or its prompt's start cut (left); either way counted and reported")


class StageSpec(Strict):
    domain: str
    steps: int | None = Field(None, gt=0, description="optimizer steps (or epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the stage's domain instead of steps: "
                                 "ceil(epochs x its global batches per epoch), the same for every method, printed")
    lr: float | None = Field(None, gt=0, description="default: train.lr")
    kind: Literal["sft", "dpo"] = Field("sft", description="sft: causal-LM loss; dpo: preference pairs, DPO loss")
    beta: float = Field(0.1, gt=0, description="DPO's beta (dpo stages only)")

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give steps or epochs, one of them")
        return self


class TrainSpec(Strict):
    lr: float | None = Field(None, gt=0, description="default: 1e-3 on a built-in tiny model, 2e-5 on a real one")
    batch_size: int = Field(32, gt=0, description="sequences per optimizer step, over every worker (rows, or with "
                                                  "packing packed sequences)")
    micro_batch_size: int | None = Field(None, gt=0, description="sequences per forward pass on a worker; gradients "
                                         "accumulate up to its share of batch_size (default: the whole share)")
    packing: bool = Field(False, description="SFT rows concatenated up to max_length, attention kept within each row")
    group_by_length: bool = Field(False, description="rows of similar length batched together (less padding)")
    workers: int = Field(1, gt=0, description="Ray Train workers per branch")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    precision: Literal["fp32", "bf16", "bf16-mixed"] | None = Field(
        None, description="fp32; bf16 (weights, gradients, AdamW state in bf16); bf16-mixed (fp32 weights, bf16 "
                          "autocast). Default: fp32 on CPU, bf16-mixed with use_gpu")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: a full replica per worker; fsdp: FSDP2, "
                                                                 "weights, gradients and AdamW state sharded")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    bf16_kahan: bool = Field(True, description="under precision: bf16, AdamW keeps what bf16 rounds away from each "
                                               "update (Kahan summation, one bf16 buffer per trained weight); "
                                               "false: plain bf16 AdamW, which loses most updates at lr <= 1e-5")
    memory_gb: float | None = Field(None, gt=0, description="memory per worker on CPU, for the preflight "
                                                            "(on GPUs: what torch reports)")
    max_length: int | None = Field(None, gt=0, description="tokens per row; default: 64 on a built-in tiny model, "
                                                           "2048 on a real one")
    weight_decay: float = Field(0.0, ge=0)
    log_every: int = Field(25, gt=0, description="print the loss every N steps")
    checkpoint_every: int = Field(100, ge=0, description="resumable checkpoint every N steps (0: at the end only)")
    max_failures: int = Field(2, ge=0, description="restarts of a stage's worker group after a worker dies")
    resources_per_worker: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {}, description="custom Ray resources each worker needs, e.g. {trainer: 1} to train only on nodes started "
                        "with `ray start --resources '{\"trainer\": 4}'`")

    @model_validator(mode="after")
    def _micro_batches_fit(self):
        if self.batch_size % self.workers:
            fits = sorted({max(self.workers, self.batch_size // self.workers * self.workers),
                           -(-self.batch_size // self.workers) * self.workers})
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of workers ({self.workers}): every "
                             f"worker takes an equal share of each global batch; use batch_size "
                             f"{' or '.join(map(str, fits))}")
        share = self.batch_size // self.workers
        if self.micro_batch_size is not None and self.micro_batch_size > max(1, share):
            raise ValueError(f"micro_batch_size {self.micro_batch_size} is more than a worker's share of batch_size "
                             f"({self.batch_size} over {self.workers} worker(s): {share}); lower it or raise "
                             "batch_size")
        return self


class FFTMethod(Strict):
    kind: Literal["fft"]
    replay: float = Field(0.0, ge=0, lt=1, description="share of each SFT stage's data replayed from earlier stages")


class HFTMethod(Strict):
    kind: Literal["hft"]
    granularity: Literal[GRANULARITIES] = "category"  # type: ignore[valid-type]
    ratio: float = Field(0.5, gt=0, lt=1)
    seed: int | None = Field(None, description="the selection seed (default: the pipeline's seed); plans only")
    select_embeddings: bool = False
    replay: float = Field(0.0, ge=0, lt=1, description="share of each SFT stage's data replayed from earlier stages")
    reselect_every: int = Field(0, ge=0, description="draw a new plan every N steps within a stage (0: one per stage)")
    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        "random", description="random: the paper's draw; importance: freeze the units that matter most to "
                              "earlier domains (squared gradients on their data) and train the rest")
    importance_batches: int = Field(4, gt=0, description="batches of earlier domains' data importance is measured on")

    @model_validator(mode="after")
    def _strategy_fits(self):
        if self.strategy == "importance" and self.granularity == "element":
            raise ValueError("strategy: 'importance' ranks whole matrices; use granularity category, layer or model")
        if self.strategy == "importance" and self.reselect_every:
            raise ValueError("strategy: 'importance' draws one plan per stage; set reselect_every: 0")
        return self


class LoRAMethod(Strict):
    """Baseline: low-rank adapters on every linear layer of the blocks (peft), merged after each stage."""

    kind: Literal["lora"]
    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="adapter scale numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    replay: float = Field(0.0, ge=0, lt=1, description="share of each SFT stage's data replayed from earlier stages")


class JointMethod(Strict):
    """Reference (the multi-task upper bound of continual-learning papers): every stage trains all
    parameters on all the SFT stages' data mixed evenly, for that stage's steps; after the last
    stage it has had the same steps as each sequential branch, with every domain seen throughout."""

    kind: Literal["joint"]


Method = Annotated[FFTMethod | HFTMethod | LoRAMethod | JointMethod, Field(discriminator="kind")]


class EvalSpec(Strict):
    metric: Literal[METRIC_NAMES] = Field(  # type: ignore[valid-type]
        DEFAULT_METRIC, description="the score of every column without its own domains.<name>.metric")
    max_new_tokens: int | None = Field(None, gt=0, description="default: 16 on a built-in tiny model, 128 on a "
                                                               "real one")
    max_examples: int = Field(200, gt=0)
    batch_size: int = Field(64, gt=0)
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {}, description="custom Ray resources each evaluator needs, e.g. {evaluator: 1}, to evaluate on chosen nodes")


class TrackingSpec(Strict):
    experiment: str | None = Field(None, description="default: the pipeline's name")


class OutputSpec(Strict):
    dir: str = Field("hft_runs", description="checkpoints and Ray Train storage: a folder (on a cluster, one every "
                     "node mounts) or an object-store URI such as s3://bucket/prefix (hft_ray/storage.py)")
    keep: Literal["all", "last", "none"] | None = Field(
        None, description="stage checkpoints kept once evaluated: all (default of hft-ray run); each branch's last "
                          "(default of a Tune trial); none (the base stays, and a stage's checkpoint until the next "
                          "stage, which starts from it, is written)")

    @field_validator("dir")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        carried = credentials_in(value) if "://" in value else None
        if carried:
            raise ValueError(f"the URI carries credentials ({carried}), which would be written into MLflow and the "
                             "manifest; remove them and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")
        return value


class PipelineSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, description="the seed of the selection draw, the data order and a built-in model's "
                      "initialisation (and of the synthetic domains' data, which every seed of `seeds` shares)")
    seeds: list[int] | None = Field(None, min_length=1, description="run every method once per seed, as a branch "
                                    "of its own; the results come as means, deviations and paired comparisons")
    compare_to: str | None = Field(None, description="the method every other one is compared with over seeds "
                                   "(default: the first listed)")
    model: ModelSpec
    pretrain: PretrainSpec | None = None
    domains: dict[str, DomainSpec] = Field(min_length=1)
    stages: list[StageSpec] = Field(min_length=1)
    train: TrainSpec = TrainSpec()
    methods: dict[str, Method] = Field(min_length=1)
    eval: EvalSpec = EvalSpec()
    tracking: TrackingSpec = TrackingSpec()
    output: OutputSpec = OutputSpec()

    _notes: tuple[str, ...] = PrivateAttr(())  # the defaults chosen for the model, and warnings

    @model_validator(mode="after")
    def _defaults_for_the_model(self):
        """Unset lr, max_length and max_new_tokens take the model's defaults (model_defaults.py)."""
        self._notes = fill_model_defaults(self)
        return self

    @property
    def notes(self) -> tuple[str, ...]:  # to print at the start: defaults chosen, rates too high
        return self._notes

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) < len(seeds):
            raise ValueError("a seed is listed twice; list each seed once")
        return seeds

    @property
    def run_seeds(self) -> list[int]:
        return self.seeds or [self.seed]

    @property
    def reference(self) -> str:
        return self.compare_to or next(iter(self.methods))

    def for_seed(self, seed: int) -> PipelineSpec:
        """The pipeline as one seed of `seeds` runs it."""
        return self.model_copy(update={"seed": seed, "seeds": None})

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def precision(self) -> str:
        return self.train.precision or ("bf16-mixed" if self.train.use_gpu else "fp32")

    def stage_lr(self, stage: StageSpec) -> float:
        return stage.lr or self.train.lr

    def earlier_domains(self, index: int) -> list[str]:
        """What the model knows before stage `index` (1-based): the pretrain domains and the
        domains of earlier stages, each once, in order. Importance-aware selection protects these."""
        names = (self.pretrain.domains if self.pretrain else []) + [s.domain for s in self.stages[:index - 1]]
        return list(dict.fromkeys(names))


def _format_error(error: dict) -> str:
    loc = list(error["loc"])
    if len(loc) > 2 and loc[0] == "methods" and loc[2] in ("fft", "hft", "lora", "joint"):
        del loc[2]  # the tag of the method union, not a key the user wrote
    key = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; check its spelling against the pipeline schema (README)"
    given = error.get("input")
    secret = isinstance(given, str) and "://" in given and credentials_in(given)
    shown = "" if isinstance(given, (dict, list)) or given is None or secret else f" (got {given!r})"
    return f"{key}: {error['msg'].removeprefix('Value error, ')}{shown}"


def parse_spec(data: Any, source: str = "pipeline") -> PipelineSpec:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of keys (name, model, domains, stages, methods, ...)")
    problems = []
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as error:
        problems = [_format_error(e) for e in error.errors()]
        spec = None
    problems += cross_problems(data)
    if problems:
        raise UserError(*problems)
    return spec


def load_spec(path: str | Path, overrides: list[str] = ()) -> tuple[PipelineSpec, str]:
    """The validated spec and the file's text (logged to MLflow as run)."""
    data, text = read_yaml(path, "pipeline", overrides)
    return parse_spec(data, str(path)), text
