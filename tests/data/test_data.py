"""Data: built-in domains, file and dataset loaders, the split, errors that name the key, encoding."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hft_ray.data.domains import BUILTIN_DOMAINS, Example
from hft_ray.data.encoding import IGNORE_INDEX, encode
from hft_ray.data.loading import DomainData, load_domain, render_chat
from hft_ray.errors import UserError
from hft_ray.train.models import char_tokenizer

torch.set_num_threads(1)

PC_ROWS = [{"prompt": f"Q {i}=", "completion": f"a{i}"} for i in range(20)]
CHAT_ROWS = [
    {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"hi {i}"},
        {"role": "assistant", "content": f"hello {i}"},
    ]}
    for i in range(10)
]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


# -- built-in domains ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(set(BUILTIN_DOMAINS) - {"world-facts"}))  # a fixed set, for real models
def test_builtin_domains_are_deterministic_short_and_split(kind):
    data = load_domain("d", f"builtin:{kind}", seed=3, eval_size=50, train_size=300)
    again = load_domain("d", f"builtin:{kind}", seed=3, eval_size=50, train_size=300)
    assert data == again
    assert load_domain("d", f"builtin:{kind}", seed=4, eval_size=50, train_size=300) != data
    assert all(len(e.prompt) + max(len(getattr(e, a, "")) for a in ("completion", "chosen", "rejected")) <= 24
               for e in data.train + data.eval)
    if BUILTIN_DOMAINS[kind].is_knowledge:
        assert data.is_knowledge and data.eval == data.train and len(data.train) == 300
    else:
        assert len(data.train) == 300 and len(data.eval) == 50
        # Unseen inputs: no eval prompt occurs in training.
        assert not {e.prompt for e in data.eval} & {e.prompt for e in data.train}


def test_skill_examples_are_what_their_description_says():
    upper = load_domain("u", "builtin:upper", eval_size=5, train_size=5)
    assert all(e.completion == e.prompt[2:-1].upper() and e.prompt.startswith("U ") for e in upper.train)
    caesar = load_domain("c", "builtin:caesar", eval_size=1, train_size=1).train[0]
    assert caesar.completion == "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in caesar.prompt[2:-1])
    facts = load_domain("f", "builtin:facts")
    assert len(facts.train) == BUILTIN_DOMAINS["facts"].default_train_size
    assert len({e.prompt for e in facts.train}) == len(facts.train)


def test_unknown_builtin_lists_the_known_ones():
    unknown = r"domains\.x\.source: 'builtin:nope' is not a built-in domain; .*builtin:facts"
    with pytest.raises(UserError, match=unknown):
        load_domain("x", "builtin:nope")


# -- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_prompt_completion_files(tmp_path, suffix):
    path = write(tmp_path / f"d{suffix}", PC_ROWS)
    data = load_domain("qa", {"path": str(path)}, seed=1, eval_size=3)
    assert isinstance(data, DomainData) and not data.is_knowledge
    assert len(data.eval) == 3 and len(data.train) == 17
    assert sorted(data.train + data.eval, key=lambda e: int(e.prompt[2:-1])) == [Example(**r) for r in PC_ROWS]
    assert load_domain("qa", {"path": str(path)}, seed=1, eval_size=3) == data  # the split is fixed by the seed
    assert load_domain("qa", {"path": str(path)}, seed=2, eval_size=3).eval != data.eval


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_chat_files(tmp_path, suffix):
    path = write(tmp_path / f"c{suffix}", CHAT_ROWS)
    data = load_domain("chat", {"path": str(path)}, eval_size=2)
    example = next(e for e in data.train + data.eval if e.completion == "hello 0")
    assert example.prompt == "system: be brief\nuser: hi 0\nassistant: "
    # The explicit format gives the same as auto-detection.
    assert load_domain("chat", {"path": str(path)}, format="chat", eval_size=2) == data


def test_a_chat_keeps_its_turns_and_plainly_renders_up_to_the_last_assistant_turn():
    example = render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                           {"role": "user", "content": "unanswered"}])
    assert example == Example("user: a\nassistant: b\nuser: c\nassistant: ", "d",
                              (("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")))


def test_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(PC_ROWS).save_to_disk(str(tmp_path / "ds"))
    data = load_domain("qa", {"dataset": str(tmp_path / "ds"), "split": "train"}, eval_size=4)
    assert len(data.train) == 16 and len(data.eval) == 4


def test_knowledge_file_is_evaluated_on_its_training_rows(tmp_path):
    data = load_domain("k", {"path": str(write(tmp_path / "k.jsonl", PC_ROWS))}, knowledge=True)
    assert data.train == data.eval and len(data.train) == 20


def test_a_file_marked_knowledge_in_the_pipeline_is_evaluated_on_its_training_rows(tmp_path):
    """A user's jsonl of invented facts: held out, its eval rows are facts no model could know."""
    from hft_ray.config.preflight import prepare
    from hft_ray.config.spec import parse_spec

    path = write(tmp_path / "facts.jsonl", PC_ROWS)
    spec = parse_spec({"name": "k", "model": {"source": "builtin:tiny-llama"},
                       "domains": {"mine": {"source": {"path": str(path)}, "knowledge": True, "match": "word"},
                                   "held": {"source": {"path": str(path)}}},
                       "stages": [{"domain": "mine", "steps": 1}], "methods": {"fft": {"kind": "fft"}},
                       "output": {"dir": str(tmp_path / "runs")}})
    domains = prepare(spec).domains
    mine = domains["mine"]
    assert mine.is_knowledge and mine.eval == mine.train and len(mine.eval) == 20
    assert domains["mine"].match == "word" and domains["held"].match == "exact"
    assert not set(domains["held"].eval) & set(domains["held"].train)


def test_world_facts_are_knowledge_scored_by_word_and_asked_as_a_chat():
    from hft_ray.data.world_facts import WORLD_FACTS

    data = load_domain("world", "builtin:world-facts")
    assert data.is_knowledge and data.match == "word" and data.eval == data.train
    assert len(data.train) == len(WORLD_FACTS) >= 50
    plain = "user: What is the capital of France?\nassistant: The capital of France is"
    assert data.train[0] == Example(plain, " Paris", (("user", "What is the capital of France?"),
                                                      ("assistant", "The capital of France is Paris.")))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"domains\.qa\.source: file '.*x\.jsonl' does not exist"):
        load_domain("qa", {"path": str(tmp_path / "x.jsonl")})


def test_rows_lacking_a_column_are_named(tmp_path):
    rows = [dict(r) for r in PC_ROWS]
    del rows[2]["completion"]
    rows[6]["completion"] = None
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=r"domains\.qa\.source: rows 3, 7 lack 'completion'"):
        load_domain("qa", {"path": str(path)})


def test_chat_rows_without_assistant_turn_are_named(tmp_path):
    rows = [dict(r) for r in CHAT_ROWS]
    rows[1] = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(UserError, match=r"domains\.c\.source: rows 2 lack a valid 'messages'"):
        load_domain("c", {"path": str(write(tmp_path / "c.jsonl", rows))})


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match=r"domains\.qa\.source: file '.*e\.jsonl' is empty"):
        load_domain("qa", {"path": str(tmp_path / "e.jsonl")})


def test_unknown_columns_and_format(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(UserError, match=r"cannot tell the format of .* from its columns \['answer', 'question'\]"):
        load_domain("qa", {"path": str(path)})
    with pytest.raises(UserError, match=r"domains\.qa\.format: 'alpaca' is not a format"):
        load_domain("qa", {"path": str(path)}, format="alpaca")


def test_unreadable_sources(tmp_path):
    with pytest.raises(UserError, match=r"domains\.qa\.source: file '.*d\.txt' has an unknown type"):
        load_domain("qa", {"path": str(tmp_path / "d.txt")})
    with pytest.raises(UserError, match=r"domains\.qa\.source: cannot load dataset"):
        load_domain("qa", {"dataset": str(tmp_path / "nothing-here")})
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(UserError, match=r"line 2 is not JSON"):
        load_domain("qa", {"path": str(tmp_path / "bad.jsonl")})


# -- encoding --------------------------------------------------------------------------------------


def test_encode_masks_prompt_and_padding():
    tokenizer = char_tokenizer()
    examples = [Example("U ab=", "AB"), Example("C abcde=", "defgh")]
    batch = encode(examples, tokenizer, max_length=64, domain="d")
    assert batch["input_ids"].shape == (2, len("C abcde=") + len("defgh") + 1)  # padded to the longest
    for row, example in enumerate(examples):
        n_prompt, n_completion = len(example.prompt), len(example.completion) + 1  # + EOS, no BOS
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert tokenizer.decode(ids[:n_prompt]) == example.prompt  # no BOS: the char tokenizer adds none
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[n_prompt + n_completion:] == IGNORE_INDEX).all()
        assert (labels[n_prompt:n_prompt + n_completion] == ids[n_prompt:n_prompt + n_completion]).all()
        assert tokenizer.decode(labels[n_prompt:n_prompt + n_completion - 1]) == example.completion
        assert labels[n_prompt + n_completion - 1] == tokenizer.eos_token_id
        assert mask.tolist() == [1] * (n_prompt + n_completion) + [0] * (len(mask) - n_prompt - n_completion)
        assert (ids[n_prompt + n_completion:] == tokenizer.pad_token_id).all()


def test_encode_rejects_prompts_longer_than_max_length():
    examples = [Example("short=", "x"), Example("a much longer prompt=", "x")]
    with pytest.raises(UserError, match=r"domains\.qa: prompts longer than train\.max_length=10 .*row 2 \(21 tokens\)"):
        encode(examples, char_tokenizer(), max_length=10, domain="qa")
    # A completion that does not fit is cut instead.
    assert encode([Example("abc=", "x" * 20)], char_tokenizer(), max_length=10)["input_ids"].shape == (1, 10)


def test_preference_rows_load_from_a_file_as_pairs(tmp_path):
    rows = [{"prompt": f"Q{i}:", "chosen": " good", "rejected": " bad"} for i in range(20)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_domain("p", {"path": str(path)}, eval_size=5)
    assert data.is_preference and len(data.train) == 16 and len(data.eval) == 4  # a fifth held out
    assert data.train[0].chosen == " good" and data.train[0].rejected == " bad"

