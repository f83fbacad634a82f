"""Domains' data: built-in synthetic suites, local files, `datasets` datasets, split into train and eval.

A domain's `source` is
- `"builtin:<kind>"`, a kind of hft_ray.data.domains.BUILTIN_DOMAINS;
- `{"path": "x.jsonl"}` (also .json, .parquet, .csv);
- `{"dataset": "<name or local folder>", "split": "train", "config": None}` via datasets.load_dataset.
Rows are `prompt_completion` (columns prompt, completion) or `chat` (column messages: a list
of {role, content}); `format="auto"` tells them apart by their columns.

Every problem is a UserError that names the key (`domains.<name>.source`, ...), so the pipeline
check can report all of them before anything starts.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hft_ray.data.domains import BUILTIN_DOMAINS, Example, Preference
from hft_ray.errors import UserError

FORMATS = ("auto", "prompt_completion", "chat", "preference")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

__all__ = ["Example", "Preference", "DomainData", "FORMATS", "load_domain", "render_chat"]


@dataclass(frozen=True)
class DomainData:
    """A domain's examples: `train` to fine-tune on, `eval` to score (disjoint from train
    unless the domain is knowledge, where eval = train)."""

    name: str
    train: tuple[Example, ...] | tuple[Preference, ...]
    eval: tuple[Example, ...] | tuple[Preference, ...]
    is_knowledge: bool = False
    match: str = "exact"  # how greedy answers are scored: "exact" or "word" (hft_ray/train/evaluation.py)
    tokens: str | None = None  # the train rows tokenized, once fitted (hft_ray/data/tokens.py): their folder
    token_rows: int = 0        # rows in that folder

    @property
    def is_preference(self) -> bool:
        """Preference pairs (prompt, chosen, rejected): trained by DPO stages, scored by reward accuracy."""
        return bool(self.train) and isinstance(self.train[0], Preference)


def load_domain(name: str, source: str | Mapping, *, format: str = "auto", seed: int = 0,
                eval_size: int = 200, train_size: int | None = None,
                knowledge: bool | None = None, match: str | None = None) -> DomainData:
    """Load and split one domain. The split is a pure function of the rows and `seed`.

    Built-in skills generate `train_size` (default: the kind's) + `eval_size` distinct examples
    and hold out `eval_size`; knowledge (built-in `facts` and `world-facts`, or `knowledge=True`,
    the pipeline's `domains.<name>.knowledge`) keeps every row for training and evaluates on the
    same rows. A file or dataset holds out
    min(eval_size, rows // 5) rows and keeps at most `train_size` of the rest. `match` overrides
    how answers are scored (default: the built-in kind's, else "exact")."""
    data = _load(name, source, format, seed, eval_size, train_size, knowledge)
    return data if match is None else replace(data, match=match)


def _load(name, source, format, seed, eval_size, train_size, knowledge) -> DomainData:
    key = f"domains.{name}"
    if format not in FORMATS:
        raise UserError(f"{key}.format: {format!r} is not a format; use one of {', '.join(FORMATS)}")
    if isinstance(source, str):
        if not source.startswith("builtin:"):
            raise UserError(
                f"{key}.source: {source!r} is not a source; give 'builtin:<kind>' "
                f"({', '.join(BUILTIN_DOMAINS)}), {{path: file}} or {{dataset: name}}"
            )
        return _builtin(name, source, seed, eval_size, train_size, bool(knowledge))
    rows = _read_rows(key, source)
    examples = _to_examples(f"{key}.source", _describe(source), rows, format)
    knowledge = bool(knowledge)
    if knowledge:
        kept = examples if train_size is None else examples[:train_size]
        return DomainData(name, tuple(kept), tuple(kept), True)
    if len(examples) < 2:
        raise UserError(f"{key}.source: {_describe(source)} has {len(examples)} row; "
                        "a held-out eval split needs at least 2")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, min(eval_size, len(examples) // 5))
    eval_rows = [examples[i] for i in sorted(order[:n_eval])]
    train_rows = [examples[i] for i in sorted(order[n_eval:])]
    if train_size is not None:
        train_rows = train_rows[:train_size]
    return DomainData(name, tuple(train_rows), tuple(eval_rows), False)


def _builtin(name: str, source: str, seed: int, eval_size: int, train_size: int | None,
             knowledge: bool = False) -> DomainData:
    kind_name = source.removeprefix("builtin:")
    kind = BUILTIN_DOMAINS.get(kind_name)
    if kind is None:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_DOMAINS)
        raise UserError(f"domains.{name}.source: {source!r} is not a built-in domain; built-in domains: {known}")
    n_train = kind.default_train_size if train_size is None else train_size
    wanted = n_train if kind.is_knowledge or knowledge else n_train + eval_size
    if kind.max_size is not None and wanted > kind.max_size:
        raise UserError(f"domains.{name}: {source} has {kind.max_size} distinct examples; train_size "
                        f"{n_train}{'' if kind.is_knowledge or knowledge else f' + eval_size {eval_size}'} asks "
                        f"for {wanted}; lower them")
    # The kind's name is mixed into the seed so that two domains never share a draw.
    rng = random.Random(f"{kind_name}:{seed}")
    if kind.is_knowledge or knowledge:
        examples = tuple(kind.generate(rng, n_train))
        return DomainData(name, examples, examples, True, kind.match)
    # Prompts are distinct, so holding out whole examples keeps eval inputs unseen in training.
    examples = kind.generate(rng, n_train + eval_size)
    return DomainData(name, tuple(examples[eval_size:]), tuple(examples[:eval_size]), False, kind.match)


def _describe(source: Mapping) -> str:
    if "path" in source:
        return f"file {str(source['path'])!r}"
    return f"dataset {str(source.get('dataset'))!r}"


def _read_rows(key: str, source: Mapping) -> list[dict]:
    if not isinstance(source, Mapping) or ("path" in source) == ("dataset" in source):
        raise UserError(f"{key}.source: {source!r} needs exactly one of 'path' or 'dataset' "
                        "(or a 'builtin:<kind>' string)")
    if "path" in source:
        unknown = set(source) - {"path"}
        if unknown:
            raise UserError(f"{key}.source: unknown keys {sorted(unknown)} beside 'path'")
        return _read_file(f"{key}.source", Path(str(source["path"])).expanduser())
    unknown = set(source) - {"dataset", "split", "config"}
    if unknown:
        raise UserError(f"{key}.source: unknown keys {sorted(unknown)}; a dataset source takes dataset, split, config")
    return _read_dataset(f"{key}.source", str(source["dataset"]), source.get("split") or "train", source.get("config"))


def _read_file(key: str, path: Path) -> list[dict]:
    if path.suffix not in FILE_SUFFIXES:
        raise UserError(f"{key}: file {str(path)!r} has an unknown type; use one of {', '.join(FILE_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{key}: file {str(path)!r} does not exist")
    try:
        if path.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise UserError(f"{key}: file {str(path)!r} line {number} is not JSON ({error.msg})") from None
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data if isinstance(data, list) else _columns_to_rows(data) if isinstance(data, dict) else None
            if rows is None:
                raise UserError(f"{key}: file {str(path)!r} holds neither a list of rows nor a dict of columns")
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                # An empty CSV cell is a missing value: CSV cannot tell '' from nothing.
                rows = [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(handle)]
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
    except UserError:
        raise
    except (OSError, ValueError) as error:  # json.JSONDecodeError, pyarrow errors, bad encodings
        raise UserError(f"{key}: cannot read file {str(path)!r} ({str(error).splitlines()[0]})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{key}: file {str(path)!r} has rows that are not objects")
    if not rows:
        raise UserError(f"{key}: file {str(path)!r} is empty")
    return rows


def _columns_to_rows(columns: dict) -> list[dict] | None:
    if not columns or not all(isinstance(v, list) for v in columns.values()):
        return None
    n = len(next(iter(columns.values())))
    return [{k: v[i] if i < len(v) else None for k, v in columns.items()} for i in range(n)]


def _read_dataset(key: str, name: str, split: str, config: str | None) -> list[dict]:
    import datasets

    try:
        if Path(name).expanduser().is_dir() and (Path(name).expanduser() / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"{key}.split: {split!r} is not a split of {name!r}; splits: {', '.join(loaded)}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError)
        raise UserError(
            f"{key}: cannot load dataset {name!r} (split {split!r}, config {config!r}): {str(error).splitlines()[0]}; "
            "give a local dataset folder or a dataset already in the local cache (nothing is downloaded offline)"
        ) from None
    rows = loaded.to_list()
    if not rows:
        raise UserError(f"{key}: dataset {name!r} split {split!r} is empty")
    return rows


def _rows_list(indices: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _to_examples(key: str, where: str, rows: list[dict], format: str) -> list[Example]:
    columns = set().union(*(row.keys() for row in rows))
    if format == "auto":
        if {"chosen", "rejected"} <= columns:
            format = "preference"
        elif "messages" in columns:
            format = "chat"
        elif {"prompt", "completion"} & columns:
            format = "prompt_completion"
        else:
            raise UserError(
                f"{key}: cannot tell the format of {where} from its columns {sorted(columns)}; "
                "prompt_completion needs 'prompt' and 'completion', chat needs 'messages'"
            )
    problems = []
    if format == "prompt_completion":
        for column in ("prompt", "completion"):
            lacking = [i for i, row in enumerate(rows, 1) if row.get(column) is None]
            if lacking:
                problems.append(f"{key}: rows {_rows_list(lacking)} lack {column!r} (in {where}; rows count from 1)")
        if problems:
            raise UserError(*problems)
        return [Example(str(row["prompt"]), str(row["completion"])) for row in rows]
    if format == "preference":
        for column in ("prompt", "chosen", "rejected"):
            lacking = [i for i, row in enumerate(rows, 1) if row.get(column) is None]
            if lacking:
                problems.append(f"{key}: rows {_rows_list(lacking)} lack {column!r} (in {where}; rows count from 1)")
        if problems:
            raise UserError(*problems)
        return [Preference(str(row["prompt"]), str(row["chosen"]), str(row["rejected"])) for row in rows]
    examples, bad = [], []
    for i, row in enumerate(rows, 1):
        try:
            examples.append(render_chat(row.get("messages")))
        except ValueError:
            bad.append(i)
    if bad:
        raise UserError(
            f"{key}: rows {_rows_list(bad)} lack a valid 'messages' (a list of {{role, content}} with an "
            f"assistant turn; in {where}; rows count from 1)"
        )
    return examples


def render_chat(messages) -> Example:
    """A chat as one example: its turns up to the last assistant turn (for a model's own chat
    template, hft_ray/data/chat.py), and hft-ray's plain rendering for a model without one: every
    turn before the last assistant turn as 'role: content' lines, then 'assistant: ' as the
    prompt; the last assistant turn's content as the completion.
    Raises ValueError when there is no assistant turn or a turn is malformed."""
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        messages = json.loads(messages)
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and m.get("content") is not None for m in messages
    ):
        raise ValueError("messages must be a list of {role, content}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant turn")
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:last]) + "assistant: "
    turns = tuple((str(m["role"]), str(m["content"])) for m in messages[:last + 1])
    return Example(prompt, str(messages[last]["content"]), turns)
