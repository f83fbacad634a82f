"""A stage's batches from token files: each rank reads only its share of each global batch.

A stage trains on a pool of rows: `Part`s of domains' token folders (hft_ray/data/tokens.py),
one domain whole, or several mixed. Every rank computes the same shuffled order from the stage's
seed, cuts it into global batches of `batch_size` sequences, takes its share, and reads those
rows alone from the memory-mapped files. A sequence is one row padded to the batch's longest
(rounded up to a multiple of 8), or with `packing`, several rows concatenated up to
`max_length`, their `position_ids` restarting at every row so that attention (transformers builds
the block-diagonal mask from them) never crosses rows. `group_by_length` sorts rows of similar
length into the same batches. A rank's share is split into micro-batches for gradient
accumulation; each micro-batch carries the global batch's count of learnt tokens, so the loss is
the mean over every learnt token of the global batch, across rows, micro-batches and ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from hft_ray.data.encoding import IGNORE_INDEX
from hft_ray.data.tokens import local_folder, record_batches

GROUPED_BATCHES = 64  # group_by_length sorts this many batches' rows at a time
PACK_WINDOW = 8       # packing: open sequences a row may go into


@dataclass(frozen=True)
class Part:
    """Rows of a stage's pool from one token folder: every row once (`take` None), or `take`
    rows: drawn without repetition with `seed`, or without a seed the rows in order, the file
    repeated as often as `take` asks (a balanced mix of a small domain beside a large one)."""

    folder: str
    take: int | None = None
    seed: int | None = None


class Pool:
    """A stage's rows: for each, the file and row it is, its length and learnt tokens. The files'
    record batches stay memory-mapped; a read touches only the rows it asks for."""

    def __init__(self, parts: Sequence[Part]):
        self.batches = [record_batches(local_folder(part.folder)) for part in parts]
        starts = [np.cumsum([0] + [b.num_rows for b in batches]) for batches in self.batches]
        self.starts = starts  # per part: the first row of each record batch, and the row count last
        refs = [_rows(part, int(start[-1])) for part, start in zip(parts, starts, strict=True)]
        self.part = np.concatenate([np.full(len(r), i, np.int32) for i, r in enumerate(refs)])
        self.row = np.concatenate(refs)
        lengths = [_column(batches, "length") for batches in self.batches]
        learnt = [_column(batches, "learnt") for batches in self.batches]
        self.length = np.concatenate([lengths[i][r] for i, r in enumerate(refs)]).astype(np.int64)
        self.learnt = np.concatenate([learnt[i][r] for i, r in enumerate(refs)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.row)

    def read(self, indices: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """(ids, labels) of the pool's rows `indices`, read from their files' record batches."""
        indices = np.asarray(indices, dtype=np.int64)
        found: dict[int, tuple[list[int], list[int]]] = {}
        rows = self.row[indices]
        for part in np.unique(self.part[indices]):
            mine = self.part[indices] == part
            chunk = np.searchsorted(self.starts[part], rows[mine], side="right") - 1
            for which in np.unique(chunk):
                picked = chunk == which
                batch = self.batches[part][which]
                at = pa.array(rows[mine][picked] - self.starts[part][which])
                ids, labels = batch.column(0).take(at).to_pylist(), batch.column(1).take(at).to_pylist()
                for index, row_ids, row_labels in zip(indices[mine][picked], ids, labels, strict=True):
                    found[int(index)] = (row_ids, row_labels)
        return [found[int(i)] for i in indices]


def _column(batches: list[pa.RecordBatch], name: str) -> np.ndarray:
    arrays = [batch.column(name).to_numpy() for batch in batches]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int32)


def _rows(part: Part, rows: int) -> np.ndarray:
    if part.take is None:
        return np.arange(rows, dtype=np.int64)
    if part.seed is None:
        return np.arange(part.take, dtype=np.int64) % max(rows, 1)
    return np.random.default_rng(part.seed).permutation(rows)[:part.take]


def pack(order: np.ndarray, lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Rows in `order` concatenated into sequences of at most `max_length` tokens: each row goes
    into the first of the last PACK_WINDOW open sequences with room for it, else starts a new one
    (first fit over a window: nearly as full as first fit, linear in the rows, and the order
    stays close to the shuffle)."""
    closed, open_, room = [], [], []
    for index in order.tolist():
        length = int(lengths[index])
        slot = next((k for k, free in enumerate(room) if free >= length), None)
        if slot is None:
            if len(open_) == PACK_WINDOW:
                closed.append(open_.pop(0))
                room.pop(0)
            open_.append([])
            room.append(max_length)
            slot = len(open_) - 1
        open_[slot].append(index)
        room[slot] -= length
    return closed + open_


def _grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """`order` with rows of similar length next to each other: chunks of GROUPED_BATCHES batches
    sorted by length, cut into batches, and the batches shuffled."""
    chunk = batch_size * GROUPED_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))]) if batches else order


def sequences(pool: Pool, *, seed: int, epoch: int, batch_size: int, max_length: int, packing: bool = False,
              group_by_length: bool = False) -> Sequence:
    """One epoch's sequences (each the pool rows it holds), in training order: packed, a list of
    lists; else an array of one row each (8 bytes a row, not a Python list's ~100). The shuffle
    depends on (seed, epoch) only, so every rank computes the same."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()
    if packing:
        return pack(order, pool.length, max_length)
    if group_by_length:
        order = _grouped(order, pool.length, batch_size, np.random.default_rng(seed * 100_003 + epoch))
    return order.astype(np.int64)[:, None]


def global_batches(pool: Pool, *, seed: int, batch_size: int, **layout) -> Iterator[list[list[int]]]:
    """Endless epochs of global batches of `batch_size` sequences (the last partial batch of an
    epoch left out, unless the epoch has fewer sequences than one batch)."""
    epoch = 0
    while True:
        epoch_sequences = sequences(pool, seed=seed, epoch=epoch, batch_size=batch_size, **layout)
        count = len(epoch_sequences)
        for start in range(0, count - batch_size + 1 if count >= batch_size else 1, batch_size):
            batch = epoch_sequences[start:start + batch_size]
            yield batch.tolist() if isinstance(batch, np.ndarray) else batch
        epoch += 1


def batches_per_epoch(pool: Pool, *, seed: int, batch_size: int, **layout) -> int:
    """Global batches in the first epoch (what `epochs` are counted in)."""
    return max(1, len(sequences(pool, seed=seed, epoch=0, batch_size=batch_size, **layout)) // batch_size)


def collate(pool: Pool, batch: Sequence[Sequence[int]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """input_ids and labels of `batch`'s sequences, right-padded to the longest rounded up to a
    multiple of 8; an attention_mask, or for packed sequences the position_ids that restart at
    each row (no attention mask: transformers derives the rows from them) with each row's first
    label unlearnt (it would be predicted from the row before)."""
    rows = pool.read([i for sequence in batch for i in sequence])
    built, cursor = [], 0
    for sequence in batch:
        ids, labels, positions = [], [], []
        for row_ids, row_labels in rows[cursor:cursor + len(sequence)]:
            ids += row_ids
            labels += [IGNORE_INDEX] + row_labels[1:]
            positions += range(len(row_ids))
        cursor += len(sequence)
        built.append((ids, labels, positions))
    width = -(-max(len(ids) for ids, _, _ in built) // 8) * 8
    input_ids = torch.full((len(built), width), pad_id, dtype=torch.long)
    labels = torch.full((len(built), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(built), width), dtype=torch.long)
    for i, (ids, row_labels, positions) in enumerate(built):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.tensor(row_labels)
        if packed:  # the padding is a sequence of its own, positions from 0
            extra[i] = torch.tensor(positions + list(range(width - len(ids))))
        else:
            extra[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


def step_batches(pool: Pool, *, seed: int, batch_size: int, micro_batch_size: int | None, rank: int, world: int,
                 pad_id: int, done: int = 0, **layout) -> Iterator[list[dict]]:
    """Each optimizer step's micro-batches for this rank, past the `done` steps trained already
    (skipped without reading a row). Each micro-batch carries `num_items_in_batch`, the global
    batch's learnt tokens over the world size: transformers' causal-LM loss divides its token sum
    by it, and DDP's gradient mean over ranks makes the result the global token mean."""
    per_rank = max(1, batch_size // world)
    micro = micro_batch_size or per_rank
    plans = global_batches(pool, seed=seed, batch_size=batch_size, **layout)
    for _ in range(done):
        next(plans)
    for plan in plans:
        learnt = int(sum(pool.learnt[i] for sequence in plan for i in sequence))
        # An epoch shorter than the world (fewer rows, or packed sequences, than workers) leaves a
        # rank no share: it repeats the batch's first sequence, since every rank must step.
        share = plan[rank * per_rank:(rank + 1) * per_rank] or plan[:1]
        yield [{**collate(pool, share[i:i + micro], pad_id, layout.get("packing", False)),
                "num_items_in_batch": max(learnt, 1) / world, "use_cache": False}
               for i in range(0, len(share), micro)]


def useful_share(pool: Pool, *, seed: int, batch_size: int, max_length: int, packing: bool = False,
                 group_by_length: bool = False, epoch: int = 0) -> float:
    """Real tokens over computed tokens (rows x padded width) in one epoch of this batching."""
    layout = {"max_length": max_length, "packing": packing, "group_by_length": group_by_length}
    epoch_sequences = sequences(pool, seed=seed, epoch=epoch, batch_size=batch_size, **layout)
    if isinstance(epoch_sequences, np.ndarray):  # one row a sequence
        lengths = pool.length[epoch_sequences[:, 0]]
    else:
        lengths = np.array([sum(int(pool.length[i]) for i in s) for s in epoch_sequences], dtype=np.int64)
    real = computed = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start:start + batch_size]
        real += int(batch.sum())
        computed += len(batch) * (-(-int(batch.max()) // 8) * 8)
    return real / computed if computed else 0.0


def part_of(examples: Sequence, tokenizer, store, *, max_length: int, truncate: str = "left") -> Part:
    """`examples` tokenized into a token folder under `store` (a path or Location), as one part:
    for a job made by hand (tests, benchmarks, `python -m hft_ray.train`)."""
    from hft_ray.data.tokens import tokenized
    from hft_ray.storage import Location

    return Part(tokenized(list(examples), tokenizer, Location(store), max_length=max_length, truncate=truncate)[0])
