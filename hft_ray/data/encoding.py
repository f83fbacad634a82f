"""Examples as tensors: prompt masking, padding, and the endless shuffled batch stream a stage
trains on. Plain torch: the train function imports it on machines without Ray or datasets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from hft_ray.data.domains import Example
from hft_ray.errors import UserError

IGNORE_INDEX = -100  # labels the loss skips: the prompt and the padding


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids with the tokenizer's own special tokens (a BOS if it adds one, once;
    the built-in char tokenizer adds none), without a trailing EOS some tokenizers append."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id and len(ids) > 1:
        ids = ids[:-1]
    return ids


def completion_ids(tokenizer, completion: str) -> list[int]:
    """The completion's token ids followed by EOS, so the model learns to stop."""
    return list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [eos_id(tokenizer)]


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("model: the tokenizer has no EOS token; the model could not learn where an answer ends")
    return tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def encode_example(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    """One example's ids and labels (-100 where nothing is learnt), unpadded and uncut: a chat
    example in the tokenizer's chat template (hft_ray/data/chat.py), else the plain rendering
    (the prompt, then the completion and EOS, learnt)."""
    if example.messages:
        from hft_ray.data.chat import tokenize_chat

        ids, learnt = tokenize_chat(tokenizer, example.messages, example.all_turns)
        return ids, [i if keep else IGNORE_INDEX for i, keep in zip(ids, learnt, strict=True)]
    prompt = prompt_ids(tokenizer, example.prompt)
    completion = completion_ids(tokenizer, example.completion)
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def fit(ids: list[int], labels: list[int], max_length: int, truncate: str = "none"):
    """The row cut to `max_length`, and what happened to it: "kept" (it fits), "truncated" (its
    answer cut at max_length, or, with truncate="left", the start of its prompt cut so the answer
    has room), "dropped" (its prompt leaves no room for a learnt token; returns None rows)."""
    if len(ids) <= max_length:
        return ids, labels, "kept"
    first = prompt_length(labels)
    if first < max_length:
        return ids[:max_length], labels[:max_length], "truncated"
    if truncate != "left" or first >= len(ids):
        return None, None, "dropped"
    start = min(first, len(ids) - max_length)
    return ids[start:start + max_length], labels[start:start + max_length], "truncated"


def encode(examples: Sequence[Example], tokenizer, max_length: int, *, domain: str = "?",
           truncate: str | None = None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels for causal-LM fine-tuning, right-padded to the longest
    example (at most `max_length`). Labels are -100 wherever nothing is learnt (the prompt, user
    and system turns, the padding); an answer that does not fit is cut at `max_length`. A row
    whose prompt leaves no room for a learnt token is a UserError, unless `truncate` says what to
    do ("left": cut the prompt's start; the preflight has dropped the others of a pipeline)."""
    if not examples:
        raise UserError(f"domains.{domain}: has no examples to encode")
    rows, too_long = [], []
    for i, example in enumerate(examples, 1):
        full_ids, full_labels = encode_example(example, tokenizer)
        ids, labels, status = fit(full_ids, full_labels, max_length, truncate or "none")
        if status != "dropped":
            rows.append((ids, labels))
        elif truncate is None:
            too_long.append((i, prompt_length(full_labels)))
    if too_long:
        listed = ", ".join(f"row {i} ({n} tokens)" for i, n in too_long[:10])
        raise UserError(
            f"domains.{domain}: prompts longer than train.max_length={max_length} allows (a prompt needs at "
            f"least one token of room for its completion): {listed}"
            + (f" and {len(too_long) - 10} more" if len(too_long) > 10 else "")
            + "; raise train.max_length or shorten the prompts"
        )
    if not rows:
        raise UserError(f"domains.{domain}: no row fits train.max_length={max_length}")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.tensor(row_labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompt_length(labels: list[int]) -> int:
    """Tokens before the first learnt one."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def batches(encoded: dict[str, torch.Tensor], batch_size: int, seed: int,
            rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs of global batches of `batch_size`; each rank gets its share.
    The shuffle depends on (seed, epoch) only, so every rank agrees on the global batch."""
    rows = next(iter(encoded.values())).shape[0]
    per_rank = max(1, batch_size // world_size)
    epoch = 0
    while True:
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for start in range(0, rows - batch_size + 1 if rows >= batch_size else 1, batch_size):
            index = order[start:start + batch_size][rank * per_rank:(rank + 1) * per_rank]
            yield {key: value[index] for key, value in encoded.items()}
        epoch += 1
