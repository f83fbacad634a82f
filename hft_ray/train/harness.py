"""Columns scored by EleutherAI's lm-evaluation-harness (the optional extra `hft-ray[harness]`):
MMLU, ARC, HellaSwag or the user's own task YAML, run on the loaded checkpoint through the
harness's Hugging Face wrapper, batched, on the evaluation's device. Never trained.

Offline by design: a task over local files (`include_path`), or one whose dataset is already in
the `datasets` cache. `check_columns` (the preflight) builds every task with the hub switched
off, so one that would need the network is refused before anything starts. A task file's
relative paths (e.g. `data_files`) are read from that file's own folder.

lm_eval is imported here only, inside the functions: the rest of hft-ray runs without it.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

INSTALL = "pip install 'hft-ray[harness]'"


@dataclass(frozen=True)
class HarnessColumn:
    task: str                  # a harness task (or group) name
    num_fewshot: int = 0
    limit: int | None = 200    # the first N documents (None: all)
    metric: str = "acc"        # as the task names it: acc, acc_norm, exact_match, ...
    include_path: str | None = None  # a folder of the user's task YAML files


@lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """The harness's task index (built-in tasks + `include_path`): seconds to build, so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _task_folder(column: HarnessColumn) -> Path | None:
    """The folder of the YAML that defines the task (None: the harness's own, or not found)."""
    entry = task_manager(column.include_path).task_index.get(column.task)
    path = getattr(entry, "yaml_path", None) or (entry.get("yaml_path") if isinstance(entry, dict) else None)
    return Path(path).parent if path and path != -1 else None


@contextlib.contextmanager
def _offline_in(folder: Path | None):
    """The hub switched off, the task file's folder as the current one, and no progress bar for
    the task's data (it reads a few hundred rows)."""
    import datasets

    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    here, bars = os.getcwd(), datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if folder is not None:
            os.chdir(folder)
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()
        os.chdir(here)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_columns(columns: dict[str, HarnessColumn]) -> list[str]:
    """Every problem with the harness columns (domain name -> column), for the preflight: lm-eval
    missing, an unknown task, a task whose data is not here, a metric the task does not report."""
    if not columns:
        return []
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return [f"domains.{name}.source.harness: lm-evaluation-harness is not installed; {INSTALL}" for name in columns]
    problems = []
    for name, column in columns.items():
        key = f"domains.{name}.source"
        manager = task_manager(column.include_path)
        if column.task not in manager.all_tasks:
            close = difflib.get_close_matches(column.task, manager.all_tasks, n=3)
            problems.append(f"{key}.harness: {column.task!r} is not an lm-evaluation-harness task"
                            + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                            + ("" if column.include_path else "; for your own task YAML files, set include_path"))
            continue
        try:
            metrics = _task_metrics(column)
        except Exception as error:  # the harness and datasets raise many kinds
            reason = " ".join(str(error).split())[:300]
            problems.append(f"{key}.harness: task {column.task!r} cannot load its data offline ({reason}); put its "
                            "dataset in the local datasets cache once (datasets.load_dataset on a machine online), "
                            "or write a task YAML over a local file and set include_path")
            continue
        if column.metric not in metrics:
            problems.append(f"{key}.metric: task {column.task!r} reports {', '.join(sorted(metrics))}, not "
                            f"{column.metric!r}")
    return problems


def _task_metrics(column: HarnessColumn) -> set[str]:
    """Build the task (its documents read, offline) and the metrics it reports."""
    from lm_eval.tasks import get_task_dict

    with _offline_in(_task_folder(column)):
        tasks = get_task_dict([column.task], task_manager(column.include_path))
    metrics = set()
    for task in _leaves(tasks):
        metrics |= {m["metric"] if isinstance(m["metric"], str) else m["metric"].__name__
                    for m in task.config.metric_list or []} or set(task.aggregation())
    return metrics


def _leaves(tasks: dict) -> list:
    """The tasks of a task dict, groups opened."""
    found = []
    for value in tasks.values():
        found += _leaves(value) if isinstance(value, dict) else [value]
    return found


def evaluate_harness(model, tokenizer, column: HarnessColumn, batch_size: int) -> tuple[float, dict]:
    """(the column's score, the harness's whole result as JSON-ready data, per-document samples
    included). The model stays where it is (its device); it is not trained."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from hft_ray.data.chat import has_template

    with _offline_in(_task_folder(column)):
        result = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                 tasks=[column.task], num_fewshot=column.num_fewshot, limit=column.limit,
                                 task_manager=task_manager(column.include_path), log_samples=True,
                                 random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                 # an instruct model is asked in its own chat template, as hft-ray's columns are
                                 apply_chat_template=has_template(tokenizer))
    scores = result["results"][column.task]
    value = next(v for k, v in scores.items() if k.split(",")[0] == column.metric)  # "acc,none": the unfiltered
    return float(value), json.loads(json.dumps(result, default=str))
