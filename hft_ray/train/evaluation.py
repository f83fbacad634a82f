"""Scores of a model on a domain's examples: every score of hft_ray/core/scores.py, from one
greedy generation pass and one teacher-forced pass per batch.

Exact match is a cliff: a half-remembered fact scores 0. Token accuracy (teacher-forced: the
share of the gold completion's tokens that are the model's top choice given the gold prefix) and
`loss` (exp of minus the completion's mean per-token loss, from the same logits) are graded;
word match and ROUGE-L read the same greedy answers as exact match. All lie in [0, 1] and are
deterministic (greedy, no sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from hft_ray.core.scores import ANSWERED, NAMES, answer_scores, filled, loss_score
from hft_ray.data.domains import Example
from hft_ray.data.encoding import IGNORE_INDEX, encode, eos_id, pad_id, prompt_ids


def evaluate(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 16,
             batch_size: int = 64) -> dict[str, float]:
    """Every score of `NAMES` of `model` on `examples` (the answer-read ones averaged over the
    examples); the model's train/eval mode is restored afterwards."""
    if not examples:
        return dict.fromkeys(NAMES, 0.0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            answers = generate_answers(model, tokenizer, [asked(e, tokenizer) for e in examples],
                                       max_new_tokens=max_new_tokens, batch_size=batch_size)
            graded = [answer_scores(a, e.completion) for a, e in zip(answers, examples, strict=True)]
            scores = {name: sum(g[name] for g in graded) / len(graded) for name in ANSWERED}
            scores.update(teacher_forced(model, tokenizer, examples, batch_size=batch_size))
    finally:
        model.train(was_training)
    return {name: float(scores[name]) for name in NAMES}


def asked(example: Example, tokenizer) -> list[int]:
    """What the model is asked: a chat example's turns before its answer in the model's chat
    template, with the generation prompt; else the plain prompt."""
    if example.messages:
        from hft_ray.data.chat import chat_prompt_ids

        return chat_prompt_ids(tokenizer, example.messages)
    return prompt_ids(tokenizer, example.prompt)


def evaluate_domain(model, tokenizer, examples, *, max_new_tokens: int = 16, batch_size: int = 64) -> dict[str, float]:
    """`evaluate` for SFT domains; for a preference domain, reward accuracy, which also fills
    every other score's cell so it has a place in every forgetting matrix."""
    from hft_ray.train.dpo import Preference, reward_accuracy

    if examples and isinstance(examples[0], Preference):
        accuracy = reward_accuracy(model, tokenizer, examples, batch_size=batch_size)
        return filled(accuracy, reward_accuracy=accuracy)
    return evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)


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


@torch.no_grad()
def teacher_forced(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 64) -> dict[str, float]:
    """{"token_accuracy", "loss"} over the completions' tokens, from one forward pass per batch:
    the share the model's top choice gets right, and exp(-mean token loss) (`loss_score`). The EOS
    is left out (the easy part of a short answer), except for an example whose completion is
    empty: it counts its EOS instead."""
    device = next(model.parameters()).device
    eos = eos_id(tokenizer)
    correct = total = 0
    nll = 0.0
    # A chat example is scored on its last answer: the one the model is asked for.
    examples = [replace(e, all_turns=False) for e in examples]
    vocab = model.get_output_embeddings().weight.shape[0]
    for start in range(0, len(examples), batch_size):
        encoded = encode(examples[start:start + batch_size], tokenizer, max_length=1 << 30, domain="eval")
        for batch in row_chunks(encoded, vocab):
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            c, n, t = _graded(logits, batch["labels"], eos, device)
            correct, nll, total = correct + c, nll + n, total + t
    if not total:
        return {"token_accuracy": 0.0, "loss": 0.0}
    return {"token_accuracy": correct / total, "loss": loss_score(nll / total)}


LOGITS_BUDGET = 1 << 28  # bytes of float32 logits one forward pass of an evaluation may hold (256 MiB)


def rows_per_pass(width: int, vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Rows of `width` tokens whose float32 logits fit `budget` (one at least)."""
    return max(1, budget // (width * vocab * 4))


def row_chunks(batch: dict[str, torch.Tensor], vocab: int, budget: int = LOGITS_BUDGET):
    """`batch` in slices of rows whose logits (rows x width x vocab, float32) fit `budget`, one row
    at least: a 128k vocabulary at batch 64 x 1,024 tokens would be 33.6 GB in one piece."""
    rows, width = batch["input_ids"].shape
    per_pass = rows_per_pass(width, vocab, budget)
    for start in range(0, rows, per_pass):
        yield {key: value[start:start + per_pass] for key, value in batch.items()}


def _graded(logits: torch.Tensor, labels: torch.Tensor, eos: int, device) -> tuple[int, float, int]:
    """(right top choices, summed token loss, tokens) over a batch's scored answer tokens."""
    gold = labels[:, 1:]
    scored = gold != IGNORE_INDEX
    only_eos = (scored & (gold != eos)).sum(1) == 0
    scored &= (gold != eos) | only_eos[:, None]
    picked = logits[:, :-1][scored.to(device)].float()  # (scored tokens, vocabulary)
    targets = gold[scored].to(device)
    return (int((picked.argmax(-1) == targets).sum()),
            float(torch.nn.functional.cross_entropy(picked, targets, reduction="sum")), int(scored.sum()))
