"""`hft-ray data PIPELINE.yaml`: what every stage will train on, without training: per domain its
rows, tokens, lengths, rows cut or dropped, padding share, and the first rows with the learnt
tokens marked (hft_ray/data/inspection.py). `--json` prints the contract on stdout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hft_ray.errors import UserError


def run_data(args: argparse.Namespace) -> int:
    from hft_ray.config.preflight import prepare
    from hft_ray.config.spec import load_spec
    from hft_ray.data.inspection import describe_domain
    from hft_ray.train.models import load_tokenizer

    spec, _ = load_spec(args.pipeline, args.set)
    unknown = [d for d in args.domain if d not in spec.domains]
    if unknown:
        raise UserError(*(f"--domain {d!r}: not a domain of the pipeline; domains: {', '.join(spec.domains)}"
                          for d in unknown))
    if args.rows < 0:
        raise UserError(f"--rows {args.rows}: give 0 or more rows to show")
    prepared = prepare(spec, Path(args.pipeline).parent)
    tokenizer = load_tokenizer(spec.model.source, spec.model.trust_remote_code, prepared.spec.model.chat_template)
    names = args.domain or [n for n in prepared.domains]
    t = prepared.spec.train
    batching = {"batch_size": t.batch_size, "packing": t.packing, "group_by_length": t.group_by_length,
                "seed": spec.seed}
    described = {name: describe_domain(prepared.domains[name], tokenizer, max_length=spec.train.max_length,
                                       truncate=spec.domains[name].truncate, report=prepared.rows.get(name),
                                       examples=args.rows, batching=batching)
                 for name in names if name in prepared.domains}
    if args.json:
        print(json.dumps({"domains": described}))
        return 0
    from hft_ray.cli.commands import _say_rows

    _say_rows(prepared)  # the defaults chosen, each domain's token folder, its rows cut or dropped
    _print(described, tokenizer, spec.train.max_length, [s.domain for s in spec.stages])
    return 0


def _print(described: dict, tokenizer, max_length: int, trained: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # a log or a pipe: no wrapping of the table at 80 columns
    packed = any(d.get("packing") for d in described.values())
    table = Table(title=f"what each domain holds (train tokens; train.max_length {max_length}; padding "
                        f"{'with packing' if packed else 'per batch'})")
    for column in ("domain", "stages", "rendering", "train / eval rows", "tokens", "learnt", "length p50/p95/max",
                   "truncated", "dropped", "padding"):
        table.add_column(column, justify="left" if column in ("domain", "rendering") else "right", no_wrap=True)
    for name, d in described.items():
        stages = ",".join(str(i + 1) for i, domain in enumerate(trained) if domain == name) or "-"
        length = d["length"]
        table.add_row(name, stages, "chat template" if d["chat"] else "plain",
                      f"{d['train_rows']} / {d['eval_rows']}", f"{d['tokens']:,}", f"{d['learnt_tokens']:,}",
                      f"{length['p50']} / {length['p95']} / {length['max']}", str(d["truncated"]),
                      str(d["dropped"]), f"{d['padding_share']:.0%}")
    console.print(table)
    marks = ("", "") if console.is_terminal else ("«", "»")  # styles do not survive a pipe; brackets do
    for name, d in described.items():
        for number, example in enumerate(d["examples"], 1):
            console.print(Text(f"\n{name} row {number} ({len(example['input_ids'])} tokens; learnt "
                               f"{'in green' if console.is_terminal else 'between « »'}):", style="bold"))
            console.print(_marked(tokenizer, example, marks))


def _marked(tokenizer, example: dict, marks: tuple[str, str]):
    """The row's text, its learnt tokens styled (and bracketed off a terminal)."""
    from rich.text import Text

    text, run, learnt = Text(), [], None
    for token, label in [*zip(example["input_ids"], example["labels"], strict=True), (None, None)]:
        is_learnt = label is not None and label != -100
        if run and (token is None or is_learnt != learnt):
            piece = tokenizer.decode(run, skip_special_tokens=False)
            text.append(f"{marks[0]}{piece}{marks[1]}" if learnt else piece, style="bold green" if learnt else "")
            run = []
        if token is not None:
            run.append(token)
            learnt = is_learnt
    return text
