"""What a stage trains on, without training: per domain its rows, tokens, lengths, the rows cut or
dropped to fit `train.max_length`, the share of padding under the stage's batching, and the first
rows exactly as a stage encodes them. `hft-ray data` prints it; its `--json` is a contract."""

from __future__ import annotations

import math

from hft_ray.data.batching import Part, Pool, useful_share
from hft_ray.data.chat import as_chat
from hft_ray.data.domains import Example, Preference
from hft_ray.data.encoding import IGNORE_INDEX, encode_example, fit
from hft_ray.data.fitting import RowReport
from hft_ray.data.loading import DomainData


def _percentile(sorted_values: list[int], q: float) -> int:
    """The nearest-rank percentile (q in [0, 100]) of sorted values."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def encoded_rows(data: DomainData, tokenizer, max_length: int, truncate: str) -> list[tuple[list[int], list[int]]]:
    """The domain's training rows as a stage encodes them (unpadded), in order; a preference pair
    counts as its prompt with the chosen answer."""
    rows = []
    for example in data.train:
        if isinstance(example, Preference):
            chosen = Example(example.prompt, example.chosen)
            example = as_chat(chosen) if example.chat else chosen
        ids, labels, status = fit(*encode_example(example, tokenizer), max_length, truncate)
        if status != "dropped":
            rows.append((ids, labels))
    return rows


def describe_domain(data: DomainData, tokenizer, *, max_length: int, truncate: str = "none",
                    report: RowReport | None = None, examples: int = 0, batching: dict | None = None) -> dict:
    """The contract of `hft-ray data --json` for one domain. `padding_share`: the share of the
    positions a stage computes that are padding, under the pipeline's batching (`batching`:
    batch_size, packing, group_by_length, seed; hft_ray/data/batching.py), over one epoch of the
    domain alone. The rows are read from the domain's token folder, as the stages read them."""
    if data.tokens is not None:
        pool = Pool([Part(data.tokens)])
        lengths = sorted(pool.length.tolist())
        rows = pool.read(range(min(examples, len(pool))))
        learnt = int(pool.learnt.sum())
        batching = {"batch_size": 32, "seed": 0, **(batching or {})}
        padding = 1 - useful_share(pool, max_length=max_length, **batching)
    else:  # preference pairs: their chosen answers, encoded as DPO does
        rows = encoded_rows(data, tokenizer, max_length, truncate)
        lengths = sorted(len(ids) for ids, _ in rows)
        learnt = sum(label != IGNORE_INDEX for _, labels in rows for label in labels[1:])
        padding = 1 - sum(lengths) / (len(lengths) * lengths[-1]) if lengths else 0.0
        rows = rows[:examples]
    loaded = len(data.train) + (0 if data.is_knowledge else len(data.eval))
    return {
        "rows": report.rows if report else loaded,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "tokens": sum(lengths),
        "learnt_tokens": learnt,
        "dropped": report.dropped if report else 0,
        "truncated": report.truncated if report else 0,
        "chat": report.chat if report else False,
        "length": {"p50": _percentile(lengths, 50), "p95": _percentile(lengths, 95), "max": lengths[-1]}
        if lengths else {"p50": 0, "p95": 0, "max": 0},
        "padding_share": round(padding, 4),
        "packing": bool((batching or {}).get("packing")) and data.tokens is not None,
        "examples": [{"input_ids": ids, "labels": labels} for ids, labels in rows],
    }
