"""A domain's training rows tokenized once per run, stored as an Arrow file every worker reads.

The driver renders and tokenizes each domain once (the fast tokenizer's batch mode, a chunk of
rows at a time), checks every row against `max_length` (hft_ray/data/encoding.py `fit`), and
writes the rows that fit, ragged, to `<output.dir>/tokens/<fingerprint>/rows.arrow`:

    input_ids: list<int32>, labels: list<int32> (-100 where nothing is learnt),
    length: int32, learnt: int32 (the row's learnt tokens after its first: those a loss scores)

The fingerprint hashes what the ids depend on (the rows, the tokenizer and its chat template, the
rendering, max_length, truncation), so a later stage, method, restart, `--resume` or Tune trial of
the same inputs finds the file and tokenizes nothing. Workers memory-map the file (an object
store's is downloaded once per node) and take only their share of each batch from it.
Plain pyarrow and tokenizers: the train function reads these files without Ray or datasets.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from hft_ray.data.domains import Example
from hft_ray.data.encoding import IGNORE_INDEX, completion_ids, fit
from hft_ray.storage import Location

FORMAT = 1            # bump when the stored layout or the rendering changes
CHUNK_ROWS = 8192     # rows tokenized (and held) at once
ROWS_FILE, META_FILE = "rows.arrow", "meta.json"
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                    ("length", pa.int32()), ("learnt", pa.int32())])


@dataclass(frozen=True)
class TokenCounts:
    """What tokenizing a domain's training rows gave: rows kept whole, cut, dropped."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def add(self, status: str) -> TokenCounts:
        return TokenCounts(**{**self.__dict__, status: getattr(self, status) + 1})


@functools.lru_cache(maxsize=4)  # a tokenizer's whole JSON is hashed once, not once per domain
def tokenizer_identity(tokenizer) -> str:
    """A digest of everything about a tokenizer that decides ids: its vocabulary and rules, its
    special tokens, its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    extra = [tokenizer.chat_template, tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__]
    return hashlib.sha256((described + json.dumps(extra, default=str)).encode()).hexdigest()


def fingerprint(examples: Sequence[Example], tokenizer_digest: str, **rendering) -> str:
    """The file name's key: the rows (content and order), the tokenizer, and how the rows are
    rendered and cut (`rendering`: chat, train_on, max_length, truncate)."""
    digest = hashlib.sha256(json.dumps([FORMAT, tokenizer_digest, sorted(rendering.items())]).encode())
    for example in examples:
        digest.update(json.dumps([example.prompt, example.completion, example.messages, example.all_turns]).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def _chunks(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(examples), size):
        yield examples[start:start + size]


def _encode_batch(tokenizer, texts: list[str], special: bool) -> list:
    """The texts' encodings, from the fast tokenizer's own batch call (parallel in Rust), or one
    by one through a slow tokenizer (no `backend_tokenizer`) as plain id lists."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode_batch(texts, add_special_tokens=special)
    return [tokenizer(text, add_special_tokens=special)["input_ids"] for text in texts]


def _ids(encoding) -> list[int]:
    return encoding if isinstance(encoding, list) else encoding.ids


def _learnt(encoding, ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Labels: a token is learnt when it starts inside a span (character offsets) of the text."""
    labels = [IGNORE_INDEX] * len(ids)
    for lo, hi in spans:
        first = encoding.char_to_token(lo) if lo < hi else None
        last = encoding.char_to_token(hi - 1) if lo < hi else None
        if first is None or last is None:  # a span edge on no token: test every token's start
            for k, (start, _) in enumerate(encoding.offsets):
                if lo <= start < hi:
                    labels[k] = ids[k]
            continue
        if encoding.token_to_chars(first)[0] < lo:  # it starts before the span: not the span's
            first += 1
        labels[first:last + 1] = ids[first:last + 1]
    return labels


def encode_rows(examples: Sequence[Example], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each example, unpadded and uncut, exactly as `encode_example` gives them,
    with the texts of a chunk tokenized in batch calls and the learnt tokens found by character
    offsets (no Python loop over tokens)."""
    from hft_ray.data.chat import learnt_spans

    chat = [e for e in examples if e.messages]
    plain = [e for e in examples if not e.messages]
    encoded: dict[int, tuple[list[int], list[int]]] = {}
    if plain:
        prompts = _encode_batch(tokenizer, [e.prompt for e in plain], True)
        answers = _encode_batch(tokenizer, [e.completion for e in plain], False)
        eos = completion_ids(tokenizer, "")  # [EOS]
        for example, prompt, answer in zip(plain, prompts, answers, strict=True):
            prompt = _ids(prompt)
            if len(prompt) > 1 and tokenizer.eos_token_id is not None and prompt[-1] == tokenizer.eos_token_id:
                prompt = prompt[:-1]  # as prompt_ids: no trailing EOS some tokenizers append
            completion = _ids(answer) + eos
            encoded[id(example)] = (prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    if chat:
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            from hft_ray.data.encoding import encode_example

            return [encode_example(e, tokenizer) for e in examples]
        rendered = [learnt_spans(tokenizer, e.messages, e.all_turns) for e in chat]
        for example, (_, spans), encoding in zip(chat, rendered,
                                                 _encode_batch(tokenizer, [t for t, _ in rendered], False),
                                                 strict=True):
            ids = encoding.ids
            encoded[id(example)] = (ids, _learnt(encoding, ids, spans))
    return [encoded[id(e)] for e in examples]


def tokenize_rows(examples: Sequence[Example], tokenizer, max_length: int, truncate: str = "none"
                  ) -> Iterator[tuple[list[int] | None, list[int] | None, str]]:
    """Every example as (ids, labels, status) after `fit`: "kept", "truncated" or "dropped"."""
    for chunk in _chunks(examples, CHUNK_ROWS):
        for ids, labels in encode_rows(chunk, tokenizer):
            yield fit(ids, labels, max_length, truncate)


def write_rows(rows: Iterable[tuple[list[int] | None, list[int] | None, str]], folder: Path,
               metadata: dict) -> dict:
    """The rows that fit, written into `folder` a chunk at a time: `rows.arrow`, then `meta.json`
    (`metadata`, the counts and the dropped rows' positions), whose presence says the folder is
    complete. Returns what meta.json holds."""
    counts, buffer, dropped = TokenCounts(), [], []
    folder.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(folder / ROWS_FILE), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for position, (ids, labels, status) in enumerate(rows):
            counts = counts.add(status)
            if ids is None:
                dropped.append(position)
                continue
            buffer.append((ids, labels))
            if len(buffer) >= CHUNK_ROWS:
                writer.write_batch(_batch(buffer))
                buffer = []
        writer.write_batch(_batch(buffer))
    meta = {**metadata, "counts": counts.__dict__, "dropped_rows": dropped}
    (folder / META_FILE).write_text(json.dumps(meta))
    return meta


def _batch(rows: list[tuple[list[int], list[int]]]) -> pa.RecordBatch:
    ids = pa.array([ids for ids, _ in rows], pa.list_(pa.int32()))
    labels = pa.array([labels for _, labels in rows], pa.list_(pa.int32()))
    offsets = labels.offsets.to_numpy()
    scored = (labels.values.to_numpy(zero_copy_only=False) != IGNORE_INDEX).astype(np.int64)
    scored[offsets[:-1][offsets[:-1] < len(scored)]] = 0  # a row's first token is never scored
    learnt = np.add.reduceat(scored, offsets[:-1]) if len(scored) else np.zeros(len(rows), np.int64)
    learnt[offsets[:-1] == offsets[1:]] = 0  # reduceat's value for an empty row is not 0
    lengths = np.diff(offsets)
    return pa.record_batch([ids, labels, pa.array(lengths, pa.int32()), pa.array(learnt, pa.int32())],
                           schema=SCHEMA)


def read_meta(folder: Path) -> dict | None:
    """A complete token folder's metadata, else None."""
    meta = folder / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else None


def record_batches(folder: str | Path) -> list[pa.RecordBatch]:
    """The folder's rows as the record batches they were written in, memory-mapped (zero copy:
    a batch's values are read from the page cache when a row of it is asked for)."""
    reader = pa.ipc.open_file(pa.memory_map(str(Path(folder) / ROWS_FILE), "r"))
    return [reader.get_batch(i) for i in range(reader.num_record_batches)]


def read_table(folder: str | Path) -> pa.Table:
    """The folder's rows, memory-mapped: read from the page cache as a batch asks for them, not
    loaded whole."""
    return pa.ipc.open_file(pa.memory_map(str(Path(folder) / ROWS_FILE), "r")).read_all()


def tokenized(examples: Sequence[Example], tokenizer, store: Location, *, max_length: int, truncate: str = "none",
              **rendering) -> tuple[str, dict]:
    """The token folder of `examples` under `store` (a folder or an object-store prefix), written
    unless one with the same fingerprint is there already, and its metadata (counts, dropped rows)."""
    key = fingerprint(examples, tokenizer_identity(tokenizer), max_length=max_length, truncate=truncate, **rendering)
    where = store / key
    if (where / META_FILE).is_file():
        return str(where), {**json.loads((where / META_FILE).read_text()), "reused": True}
    rows = tokenize_rows(examples, tokenizer, max_length, truncate)
    if not store.remote:
        store.path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokens-", dir=None if store.remote else store.path) as scratch:
        meta = write_rows(rows, Path(scratch) / key, {"fingerprint": key, "max_length": max_length})
        if where.remote:
            where.upload(Path(scratch) / key, META_FILE)
        else:
            with contextlib.suppress(OSError):  # another process wrote the same folder first: theirs stays
                os.replace(Path(scratch) / key, where.path)
    return str(where), meta


def local_folder(where: str) -> Path:
    """A token folder here: itself, or an object store's downloaded once into this node's cache."""
    location = Location(where)
    if not location.remote:
        return location.path
    cache = Path(tempfile.gettempdir()) / "hft-ray-tokens" / location.name
    if not (cache / META_FILE).is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with location.local_copy() as copy, contextlib.suppress(OSError):
            shutil.copytree(copy, cache.with_name(f".{cache.name}.{os.getpid()}"))
            os.replace(cache.with_name(f".{cache.name}.{os.getpid()}"), cache)
    return cache
