"""Scores of a model on a domain's examples: exact match of greedy answers, and token accuracy.

Exact match is a cliff: a half-remembered fact scores 0. Token accuracy (teacher-forced: the
share of the gold completion's tokens that are the model's top choice given the gold prefix)
is the graded score beside it, so a forgetting matrix shows how much is left, not only whether
all of it is. Both lie in [0, 1] and are deterministic (greedy, no sampling).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import torch

from hft_ray.data.domains import Example
from hft_ray.data.encoding import IGNORE_INDEX, encode, eos_id, pad_id, prompt_ids

METRICS = ("exact_match", "token_accuracy")


def evaluate(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 16,
             batch_size: int = 64, match: str = "exact") -> dict[str, float]:
    """{"exact_match", "token_accuracy"} of `model` on `examples`; the model's train/eval mode
    is restored afterwards. With `match="word"`, an answer counts in "exact_match" when it holds
    the completion as a whole word, any case (a chat model's "The capital of France is Paris.")."""
    if not examples:
        return {"exact_match": 0.0, "token_accuracy": 0.0}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            answers = generate_answers(model, tokenizer, [asked(e, tokenizer) for e in examples],
                                       max_new_tokens=max_new_tokens, batch_size=batch_size)
            hits = sum(answer_matches(a, e.completion, match) for a, e in zip(answers, examples, strict=True))
            exact = hits / len(examples)
            accuracy = token_accuracy(model, tokenizer, examples, batch_size=batch_size)
    finally:
        model.train(was_training)
    return {"exact_match": float(exact), "token_accuracy": float(accuracy)}


def asked(example: Example, tokenizer) -> list[int]:
    """What the model is asked: a chat example's turns before its answer in the model's chat
    template, with the generation prompt; else the plain prompt."""
    if example.messages:
        from hft_ray.data.chat import chat_prompt_ids

        return chat_prompt_ids(tokenizer, example.messages)
    return prompt_ids(tokenizer, example.prompt)


def answer_matches(answer: str, completion: str, match: str = "exact") -> bool:
    gold = completion.strip()
    if match == "word":
        return re.search(rf"(?<!\w){re.escape(gold)}(?!\w)", answer, re.IGNORECASE) is not None
    return answer == gold


def evaluate_domain(model, tokenizer, examples, *, max_new_tokens: int = 16, batch_size: int = 64,
                    match: str = "exact") -> dict[str, float]:
    """`evaluate` for SFT domains; for a preference domain, reward accuracy, which also fills the
    exact_match and token_accuracy cells so it has a place in every forgetting matrix."""
    from hft_ray.train.dpo import Preference, reward_accuracy

    if examples and isinstance(examples[0], Preference):
        accuracy = reward_accuracy(model, tokenizer, examples, batch_size=batch_size)
        return {"exact_match": accuracy, "token_accuracy": accuracy, "reward_accuracy": accuracy}
    return evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, match=match)


def generate_answers(model, tokenizer, prompts: Sequence[str | list[int]], *, max_new_tokens: int = 16,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers to `prompts` (texts, or token ids as `asked` makes them), cut at EOS and
    stripped. Batches are left-padded with an attention mask."""
    device = next(model.parameters()).device
    eos, pad = eos_id(tokenizer), pad_id(tokenizer)
    answers = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, p) if isinstance(p, str) else p for p in prompts[start:start + batch_size]]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, row_ids in enumerate(ids):
            input_ids[row, width - len(row_ids):] = torch.tensor(row_ids)
            attention_mask[row, width - len(row_ids):] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        )
        for row in output[:, width:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def token_accuracy(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 64) -> float:
    """Teacher-forced accuracy over the completions' tokens (the EOS left out: it is the easy
    part of a short answer). Examples whose completion is empty count their EOS instead."""
    device = next(model.parameters()).device
    eos = eos_id(tokenizer)
    correct = total = 0
    # A chat example is scored on its last answer: the one the model is asked for.
    examples = [replace(e, all_turns=False) for e in examples]
    for start in range(0, len(examples), batch_size):
        batch = encode(examples[start:start + batch_size], tokenizer, max_length=1 << 30, domain="eval")
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        predicted = logits[:, :-1].argmax(-1).cpu()
        gold = batch["labels"][:, 1:]
        scored = gold != IGNORE_INDEX
        only_eos = (scored & (gold != eos)).sum(1) == 0
        scored &= (gold != eos) | only_eos[:, None]
        correct += int(((predicted == gold) & scored).sum())
        total += int(scored.sum())
    return correct / total if total else 0.0
