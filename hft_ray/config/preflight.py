"""Everything checked before anything starts: the model resolves and has a role map, every
domain loads and is rendered as the model will see it (its chat template or the plain rendering)
with every row checked against `train.max_length` (rows without room dropped and counted),
every lm-evaluation-harness column's task loads offline, the storage takes a write. All problems
are reported together."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hft_ray.config.memory_check import check_memory
from hft_ray.config.spec import FileSource, HarnessSource, PipelineSpec
from hft_ray.core.roles import Geometry, assign_roles
from hft_ray.core.scores import column_metric
from hft_ray.data.fitting import RowReport, fit_domain, resolve_chat
from hft_ray.data.loading import DomainData, load_domain
from hft_ray.errors import UserError
from hft_ray.storage import Location, check_writable
from hft_ray.train.harness import HarnessColumn, check_columns
from hft_ray.train.models import load_config, resolve_source


@dataclass(frozen=True)
class Prepared:
    spec: PipelineSpec
    domains: dict[str, DomainData]  # the domains with examples (trained, or scored by hft-ray), as rendered
    harness: dict[str, HarnessColumn] = field(default_factory=dict)  # the lm-evaluation-harness columns
    rows: dict[str, RowReport] = field(default_factory=dict)  # per domain: rows kept, truncated, dropped
    steps_from_epochs: tuple[str, ...] = ()  # a line per stage given in epochs: the steps they make

    @property
    def metrics(self) -> dict[str, str]:
        """The score each column's matrix reads, by domain (README "Metrics"): a harness column's
        task metric, a preference domain's reward_accuracy, else `column_metric` of the domain's
        `metric`, eval.metric and its match (the built-in's where the file sets none)."""
        spec, metrics = self.spec, {}
        for name, domain in spec.domains.items():
            data = self.domains.get(name)
            if name in self.harness:
                metrics[name] = self.harness[name].metric
            elif data is not None and data.is_preference:
                metrics[name] = "reward_accuracy"
            else:
                metrics[name] = column_metric(spec.eval.metric, domain.metric, data.match if data else domain.match)
        return metrics


def _resolve_paths(spec: PipelineSpec, base_dir: Path) -> PipelineSpec:
    """Relative data paths are relative to the pipeline file's folder."""
    domains = {}
    for name, domain in spec.domains.items():
        source = domain.source
        if isinstance(source, FileSource) and not Path(source.path).is_absolute():
            source = FileSource(path=str((base_dir / source.path).resolve()))
        if isinstance(source, HarnessSource) and source.include_path and not Path(source.include_path).is_absolute():
            source = source.model_copy(update={"include_path": str((base_dir / source.include_path).resolve())})
        domains[name] = domain.model_copy(update={"source": source})
    model = spec.model
    if model.chat_template and not Path(model.chat_template).is_absolute():
        model = model.model_copy(update={"chat_template": str((base_dir / model.chat_template).resolve())})
    return spec.model_copy(update={"domains": domains, "model": model})


def _check_chat_template(spec: PipelineSpec) -> list[str]:
    """`model.chat_template` names a file that renders a chat."""
    path = spec.model.chat_template
    if path is None:
        return []
    if not Path(path).is_file():
        return [f"model.chat_template: no file at {path}; give a Jinja chat template's path (relative to the "
                "pipeline file)"]
    from hft_ray.train.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(spec.model.source, spec.model.trust_remote_code, path)
        tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                                      tokenize=False)
    except Exception as error:  # jinja's syntax and render errors, whatever the template raises
        return [f"model.chat_template: {path} does not render a chat ({type(error).__name__}: {error}); "
                "fix the template"]
    return []


def _check_model(spec: PipelineSpec) -> list[str]:
    try:
        source = resolve_source(spec.model.source)
        config = load_config(source, spec.model.trust_remote_code)
    except UserError as error:
        return [f"model.source: {p.removeprefix('model: ')}" for p in error.problems]
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    try:
        assign_roles({n: tuple(p.shape) for n, p in model.named_parameters()}, config.model_type,
                     Geometry.from_config(config))
    except UserError as error:
        return [f"model.source: {p.removeprefix('model: ')}" for p in error.problems]
    problems = _check_strategy(spec, model) if spec.train.strategy == "fsdp" else []
    return problems or check_memory(spec, model)


def _check_strategy(spec: PipelineSpec, model) -> list[str]:
    """What each method cannot train under FSDP2 (the method says: hft_ray/train/methods)."""
    from hft_ray.train.methods import method_class

    return [problem for name, method in spec.methods.items()
            for problem in method_class(method.kind).fsdp_problems(model, method, f"methods.{name}")]


def prepare(spec: PipelineSpec, base_dir: str | Path = ".") -> Prepared:
    """Validate what the schema cannot: the model, the data, the lengths."""
    spec = _resolve_paths(spec, Path(base_dir))
    problems = _check_model(spec) + _check_storage(spec)
    problems += [] if problems else _check_chat_template(spec)
    harness = {name: HarnessColumn(d.source.harness, d.source.num_fewshot, d.source.limit, d.source.metric,
                                   d.source.include_path)
               for name, d in spec.domains.items() if isinstance(d.source, HarnessSource)}
    problems += check_columns(harness)
    problems += [f"domains.{name}.metric: a harness column is scored by its task's metric; set "
                 f"domains.{name}.source.metric instead" for name in harness if spec.domains[name].metric]
    domains = {}
    for name, domain in spec.domains.items():
        if name in harness:
            continue
        try:
            domains[name] = load_domain(name, _source_arg(domain.source), format=domain.format, seed=spec.seed,
                                        eval_size=domain.eval_size, train_size=domain.train_size,
                                        knowledge=domain.knowledge, match=domain.match)
        except UserError as error:
            problems += error.problems
    rows = {}
    if not problems:
        problems += _check_kinds(spec, domains)
    if not problems:
        existed = Location(spec.output.dir).exists()
        domains, rows, problems = _fit_rows(spec, domains)
        if problems:  # a refused pipeline leaves nothing behind: no token folder, no output folder it made
            for report in rows.values():
                if report.tokens and not report.reused:
                    Location(report.tokens).remove()
            if not existed:
                Location(spec.output.dir).remove()
    if problems:
        raise UserError(*problems)
    spec, said = _steps_from_epochs(spec, domains)
    return Prepared(spec, domains, harness, rows, said)


def _steps_from_epochs(spec: PipelineSpec, domains: dict[str, DomainData]) -> tuple[PipelineSpec, tuple[str, ...]]:
    """Stages given in `epochs` get their steps: ceil(epochs x the global batches of one epoch of
    the stage's own domain under the pipeline's batching); every method trains those steps."""
    import math

    from hft_ray.data.batching import Part, Pool, batches_per_epoch

    t, stages, said = spec.train, [], []
    for index, stage in enumerate(spec.stages):
        if stage.epochs is None:
            stages.append(stage)
            continue
        data = domains[stage.domain]
        if data.tokens is None:  # preference pairs: one row each
            per_epoch = max(1, len(data.train) // t.batch_size)
        else:
            per_epoch = batches_per_epoch(Pool([Part(data.tokens)]), seed=spec.seed * 1000 + index + 1,
                                          batch_size=t.batch_size, max_length=t.max_length, packing=t.packing,
                                          group_by_length=t.group_by_length)
        steps = math.ceil(stage.epochs * per_epoch)
        stages.append(stage.model_copy(update={"steps": steps}))
        said.append(f"stages.{index}: {stage.epochs:g} epoch(s) of {stage.domain} = {steps} steps "
                    f"({len(data.train)} rows, {per_epoch} batches of {t.batch_size} "
                    f"{'packed sequences' if t.packing and data.tokens else 'rows'} per epoch)")
    return spec.model_copy(update={"stages": stages}), tuple(said)


def _check_storage(spec: PipelineSpec) -> list[str]:
    """An object store must take a write from here (bucket, credentials, endpoint)."""
    try:
        check_writable(Location(spec.output.dir), "output.dir")
    except UserError as error:
        return list(error.problems)
    return []


def _source_arg(source):
    return source if isinstance(source, str) else source.model_dump(exclude_none=True)


def _check_kinds(spec: PipelineSpec, domains: dict[str, DomainData]) -> list[str]:
    """DPO stages train on preference domains, SFT stages and pretraining on the others."""
    problems = []
    for index, stage in enumerate(spec.stages):
        preference = domains[stage.domain].is_preference
        if stage.kind == "dpo" and not preference:
            problems.append(f"stages.{index}.kind: 'dpo' needs preference pairs (prompt, chosen, rejected); "
                            f"domain {stage.domain!r} has prompt/completion rows")
        if stage.kind == "sft" and preference:
            problems.append(f"stages.{index}.kind: domain {stage.domain!r} holds preference pairs; "
                            "train it with kind: dpo")
    periodic = [name for name, method in spec.methods.items() if getattr(method, "reselect_every", 0)]
    if periodic and spec.train.workers > 1:
        problems.append(f"methods.{periodic[0]}.reselect_every: periodic re-selection runs on one worker; "
                        f"set train.workers: 1 (it is {spec.train.workers})")
    for index, name in enumerate(spec.pretrain.domains if spec.pretrain else []):
        if domains[name].is_preference:
            problems.append(f"pretrain.domains.{index}: {name!r} holds preference pairs; pretraining is SFT")
    return problems


def _fit_rows(spec: PipelineSpec, domains: dict[str, DomainData]):
    """Every domain rendered as the model will see it (its chat template or the plain rendering),
    every row checked against train.max_length (hft_ray/data/fitting.py); preference pairs sampled
    by DPO's encoder."""
    from hft_ray.train.dpo import encode_pairs
    from hft_ray.train.models import load_tokenizer

    tokenizer = load_tokenizer(spec.model.source, spec.model.trust_remote_code, spec.model.chat_template)
    fitted, reports, problems = {}, {}, []
    for name, data in domains.items():
        settings = spec.domains[name]
        try:
            chat = resolve_chat(settings.chat, tokenizer, f"domains.{name}")
            fitted[name], reports[name] = fit_domain(data, tokenizer, chat=chat, train_on=settings.train_on,
                                                     truncate=settings.truncate, max_length=spec.train.max_length,
                                                     store=Location(spec.output.dir) / "tokens")
            if data.is_preference:
                # A sample, as before: DPO's encoder pads whole tensors, which for a 1M-pair file would
                # not fit the driver (rows x longest x 6 int64 tensors)
                pairs = fitted[name]
                encode_pairs(list(pairs.train[:1000]) + list(pairs.eval[:200]), tokenizer, spec.train.max_length,
                             domain=name)
        except UserError as error:
            problems += error.problems
    return fitted, reports, problems
