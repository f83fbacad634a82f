"""Chat rows in the model's own chat template: the ids a stage trains on and the tokens it learns.

A row is rendered with `tokenizer.apply_chat_template` (system prompts where the template puts
them) and tokenized once, whole, with character offsets; the learnt tokens are found on that one
sequence: those inside an assistant turn's span, from the end of the template's generation prompt
to its end-of-turn token. The spans come from the lengths of rendered prefixes (the chat up to a
turn, with and without that turn), so nothing is joined from separately tokenized parts, and the
ids equal `apply_chat_template(messages, tokenize=True)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hft_ray.data.domains import Example
from hft_ray.errors import UserError

Turns = Sequence[tuple[str, str]]


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def as_chat(example: Example, all_turns: bool = True) -> Example:
    """The example as chat turns: its own, or a prompt/completion row as one user turn and one
    assistant turn."""
    messages = example.messages or (("user", example.prompt), ("assistant", example.completion))
    return Example(example.prompt, example.completion, messages, all_turns)


def as_plain(example: Example) -> Example:
    """The example in hft-ray's plain rendering only (a model without a chat template)."""
    return Example(example.prompt, example.completion)


def _render(tokenizer, turns: Turns, generation_prompt: bool = False) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def learnt_spans(tokenizer, turns: Turns, all_turns: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns (every one, or the last),
    each from the end of the generation prompt to the end of the turn's end-of-turn token (the
    whitespace the template writes after it is not learnt)."""
    text = _render(tokenizer, turns)
    spans = []
    for index, (role, _) in enumerate(turns):
        # An assistant turn that opens the chat answers nothing: it is context, not learnt.
        if role != "assistant" or index == 0 or (not all_turns and index != len(turns) - 1):
            continue
        asked = _render(tokenizer, turns[:index], generation_prompt=True)
        answered = _render(tokenizer, turns[:index + 1]).rstrip()
        if not (text.startswith(asked) and text.startswith(answered) and len(asked) < len(answered)):
            raise UserError("model: the tokenizer's chat template does not render a chat as the concatenation of "
                            "its turns (a turn's text changes with what follows it), so the learnt tokens cannot "
                            "be found on the rendered chat; set domains.<name>.chat: false")
        spans.append((len(asked), len(answered)))
    return text, spans


def tokenize_chat(tokenizer, turns: Turns, all_turns: bool = True) -> tuple[list[int], list[bool]]:
    """The chat's ids (the template's text tokenized once, its special tokens as written by the
    template: no second BOS) and, per token, whether it is learnt."""
    text, spans = learnt_spans(tokenizer, turns, all_turns)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    learnt = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), learnt


def chat_prompt_ids(tokenizer, turns: Turns) -> list[int]:
    """What a model is asked in its template: every turn before the last assistant turn, then
    the generation prompt."""
    last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
    text = _render(tokenizer, turns[:last], generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
