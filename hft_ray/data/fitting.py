"""A domain as the model will see it: rendered in the model's chat template or plainly, every row
checked against `train.max_length` before anything starts, so no row fails in a worker.

A row whose prompt leaves no room for a learnt token is dropped (or, with truncate "left", its
prompt's start is cut); a row whose answer runs past max_length is cut there. Both are counted
in a `RowReport`, which the command line prints one line per domain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from hft_ray.data.chat import as_chat, as_plain, has_template
from hft_ray.data.encoding import encode_example, fit
from hft_ray.data.loading import DomainData
from hft_ray.data.tokens import tokenize_rows, tokenized
from hft_ray.errors import UserError
from hft_ray.storage import Location


@dataclass(frozen=True)
class RowReport:
    rows: int          # train + eval rows loaded
    kept: int          # rows that fit whole
    truncated: int     # rows cut (the answer's end, or the prompt's start with truncate: left)
    dropped: int       # rows whose prompt leaves no room for the answer
    chat: bool         # rendered in the model's chat template
    tokens: str | None = None  # the token folder of its training rows
    reused: bool = False       # ... found there already (same fingerprint): nothing tokenized
    rows_per_s: float = 0.0    # ... else how fast its rows were tokenized
    token_rows: int = 0        # training rows in the token folder

    def tokens_line(self, name: str) -> str:
        if self.reused:
            return f"domains.{name}: token folder {self.tokens} reused (same rows, tokenizer and settings)"
        return (f"domains.{name}: {self.token_rows:,} training rows tokenized into {self.tokens} "
                f"({self.rows_per_s:,.0f} rows/s)")

    def line(self, name: str, max_length: int) -> str:
        how = "chat template" if self.chat else "plain rendering"
        return (f"domains.{name}: {self.rows} rows ({how}): {self.kept} fit train.max_length={max_length}, "
                f"{self.truncated} truncated, {self.dropped} dropped (prompt leaves no room for the answer)")


def resolve_chat(chat: str | bool, tokenizer, key: str) -> bool:
    """`domains.<name>.chat` against the tokenizer: auto means "when it has a template"."""
    if chat == "auto":
        return has_template(tokenizer)
    if chat and not has_template(tokenizer):
        raise UserError(f"{key}.chat: true, but the model's tokenizer has no chat template; "
                        "set chat: false (or auto) for the plain 'user: ...\\nassistant: ' rendering")
    return bool(chat)


def fit_domain(data: DomainData, tokenizer, *, chat: bool, train_on: str = "assistant", truncate: str = "none",
               max_length: int, store: Location | None = None) -> tuple[DomainData, RowReport]:
    """The domain rendered as asked, without the rows that cannot be trained (or asked) within
    `max_length`, and what happened to its rows. With `store`, its training rows are tokenized
    into a token folder there (once per fingerprint, hft_ray/data/tokens.py) that the stages read.
    Preference pairs are only marked for the chat template (DPO checks their lengths,
    hft_ray/config/preflight.py)."""
    if data.is_preference:
        rows = len(data.train) + len(data.eval)
        train, evaluated = (tuple(replace(p, chat=chat) for p in pairs) for pairs in (data.train, data.eval))
        return replace(data, train=train, eval=evaluated), RowReport(rows, rows, 0, 0, chat)
    render = (lambda e: as_chat(e, train_on == "assistant")) if chat else as_plain
    rendered = [render(e) for e in data.train]
    started = time.perf_counter()
    if store is not None:
        folder, meta = tokenized(rendered, tokenizer, store, max_length=max_length, truncate=truncate, chat=chat,
                                 train_on=train_on)
        counts, dropped = dict(meta["counts"]), set(meta["dropped_rows"])
    else:
        statuses = [status for *_, status in tokenize_rows(rendered, tokenizer, max_length, truncate)]
        folder, counts = None, {s: statuses.count(s) for s in ("kept", "truncated", "dropped")}
        dropped = {i for i, status in enumerate(statuses) if status == "dropped"}
    train = tuple(e for i, e in enumerate(rendered) if i not in dropped)
    if data.is_knowledge:  # a knowledge domain evaluates on what it trains: the same rows, checked once
        evaluated = train
    else:
        evaluated = []
        for example in map(render, data.eval):
            *_, status = fit(*encode_example(example, tokenizer), max_length, truncate)
            counts[status] += 1
            if status != "dropped":
                evaluated.append(example)
    if not train or not evaluated:
        if store is not None and not meta.get("reused"):  # no row to train: no token folder left behind
            Location(folder).remove()
        raise UserError(f"domains.{data.name}: no row leaves room for its answer within train.max_length="
                        f"{max_length} ({counts['dropped']} dropped); raise train.max_length, shorten the prompts, "
                        "or set truncate: left")
    speed = len(rendered) / max(time.perf_counter() - started, 1e-9)
    report = RowReport(sum(counts.values()), counts["kept"], counts["truncated"], counts["dropped"], chat, folder,
                       bool(store is not None and meta.get("reused")), speed, len(train))
    return replace(data, train=train, eval=tuple(evaluated), tokens=folder, token_rows=len(train)), report
