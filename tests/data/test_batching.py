"""Batches from token files: every rank's share of a global batch, micro-batches, per-batch
padding, length grouping and packing. A packed row gives the same logits as its rows alone, and
a global batch's loss is the mean over its learnt tokens however it is split."""

import numpy as np
import pytest
import torch

from hft_ray.data.batching import Part, Pool, collate, global_batches, step_batches, useful_share
from hft_ray.data.domains import Example
from hft_ray.data.encoding import IGNORE_INDEX, encode_example
from hft_ray.data.tokens import tokenized
from hft_ray.storage import Location
from hft_ray.train.models import BUILTIN_CONFIGS, char_tokenizer, load_model

LAYOUT = {"max_length": 64}


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """60 rows of lengths 6..50, tokenized with the built-in char tokenizer."""
    rng = np.random.default_rng(0)
    rows = [Example("p" * int(n) + "=", "a" * int(m)) for n, m in zip(rng.integers(2, 30, 60), rng.integers(1, 18, 60),
                                                                    strict=True)]
    where, _ = tokenized(rows, char_tokenizer(), Location(tmp_path_factory.mktemp("tokens")), max_length=64,
                         chat=False)
    return rows, Pool([Part(where)])


def test_ranks_share_each_global_batch_and_micro_batches_split_their_share(varied):
    _, pool = varied
    tokenizer = char_tokenizer()
    whole = next(step_batches(pool, seed=3, batch_size=8, micro_batch_size=None, rank=0, world=1,
                              pad_id=tokenizer.pad_token_id, **LAYOUT))
    plan = next(global_batches(pool, seed=3, batch_size=8, **LAYOUT))
    shares = [next(step_batches(pool, seed=3, batch_size=8, micro_batch_size=2, rank=r, world=2,
                                pad_id=tokenizer.pad_token_id, **LAYOUT)) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2] and all(len(m["input_ids"]) == 2 for s in shares for m in s)
    learnt = sum(int(pool.learnt[i[0]]) for i in plan)
    assert whole[0]["num_items_in_batch"] == learnt and shares[0][0]["num_items_in_batch"] == learnt / 2

    def rows(batch):
        return sorted(tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"],
                                                                            strict=True))
    assert sorted(sum((rows(m) for s in shares for m in s), [])) == rows(whole[0])
    width = whole[0]["input_ids"].shape[1]
    assert width % 8 == 0 and width - 8 < max(pool.length[i[0]] for i in plan) <= width, "padded to the batch"
    skipped = step_batches(pool, seed=3, batch_size=8, micro_batch_size=None, rank=0, world=1,
                           pad_id=tokenizer.pad_token_id, done=5, **LAYOUT)
    stream = step_batches(pool, seed=3, batch_size=8, micro_batch_size=None, rank=0, world=1,
                          pad_id=tokenizer.pad_token_id, **LAYOUT)
    for _ in range(5):
        next(stream)
    assert torch.equal(next(skipped)[0]["input_ids"], next(stream)[0]["input_ids"]), "a resumed stream goes on"


def test_packing_fills_sequences_and_grouping_reduces_padding(varied):
    _, pool = varied
    padded = useful_share(pool, seed=0, batch_size=8, **LAYOUT)
    grouped = useful_share(pool, seed=0, batch_size=8, group_by_length=True, **LAYOUT)
    packed = useful_share(pool, seed=0, batch_size=2, packing=True, max_length=128)
    assert packed > 0.9 > padded and grouped > padded, (padded, grouped, packed)
    sequences = [s for plan in [next(global_batches(pool, seed=0, batch_size=4, packing=True, **LAYOUT))] for s in plan]
    assert all(sum(pool.length[i] for i in s) <= 64 for s in sequences) and any(len(s) > 1 for s in sequences)


@pytest.mark.parametrize("model_name", sorted(BUILTIN_CONFIGS))
def test_a_packed_row_gives_its_rows_logits_and_the_token_weighted_loss(varied, model_name):
    rows, pool = varied
    tokenizer, model = char_tokenizer(), load_model(f"builtin:{model_name}", seed=0).eval()
    sequence = next(s for plan in [next(global_batches(pool, seed=1, batch_size=4, packing=True, **LAYOUT))]
                    for s in plan if len(s) >= 3)
    packed = collate(pool, [sequence], tokenizer.pad_token_id, packed=True)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start, losses, counts = 0, [], []
        for ids, labels in pool.read(sequence):
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            assert torch.allclose(logits[start:start + len(ids)], alone, atol=1e-4), "attention crossed rows"
            scored = torch.tensor(labels[1:]) != IGNORE_INDEX
            losses.append(torch.nn.functional.cross_entropy(alone[:-1][scored], torch.tensor(labels[1:])[scored],
                                                            reduction="sum"))
            counts.append(int(scored.sum()))
            start += len(ids)
        learnt = sum(counts)
        loss = model(**packed, num_items_in_batch=learnt, use_cache=False).loss
    assert loss.item() == pytest.approx(float(sum(losses)) / learnt, abs=1e-4)
    assert [encode_example(rows[int(pool.row[i])], tokenizer)[0] for i in sequence] == [ids for ids, _ in
                                                                                         pool.read(sequence)]
