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


def encode(examples: Sequence[Example], tokenizer, max_length: int, *, domain: str = "?") -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels for causal-LM fine-tuning, right-padded to the longest
    example (at most `max_length`). Labels are -100 on the prompt and the padding, so only the
    completion and its EOS are learnt; a completion that does not fit is cut at `max_length`.
    A prompt that leaves no room for a single completion token is a UserError."""
    if not examples:
        raise UserError(f"domains.{domain}: has no examples to encode")
    rows, too_long = [], []
    for i, example in enumerate(examples, 1):
        prompt = prompt_ids(tokenizer, example.prompt)
        if len(prompt) >= max_length:
            too_long.append((i, len(prompt)))
            continue
        ids = (prompt + completion_ids(tokenizer, example.completion))[:max_length]
        rows.append((ids, len(prompt)))
    if too_long:
        listed = ", ".join(f"row {i} ({n} tokens)" for i, n in too_long[:10])
        raise UserError(
            f"domains.{domain}: prompts longer than train.max_length={max_length} allows (a prompt needs at "
            f"least one token of room for its completion): {listed}"
            + (f" and {len(too_long) - 10} more" if len(too_long) > 10 else "")
            + "; raise train.max_length or shorten the prompts"
        )
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
