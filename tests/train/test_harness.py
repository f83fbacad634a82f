"""lm-evaluation-harness columns (hft_ray/train/harness.py), on the real harness: a multiple-choice
task over a local jsonl (tests/data/harness) scored on a tiny model equals the choice made by
summing the continuation's log-likelihoods by hand; the preflight names what cannot run."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the harness extra: pip install 'hft-ray[harness]'")

from hft_ray.train.harness import HarnessColumn, check_columns, evaluate_harness  # noqa: E402
from hft_ray.train.models import char_tokenizer, load_model  # noqa: E402

TASKS = Path(__file__).parents[1] / "data" / "harness"
UPPER_MC = HarnessColumn("upper_mc", limit=None, include_path=str(TASKS))


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over its tokens."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[position - 1, ids[position]].item() for position in range(len(context_ids), len(ids)))


def test_the_harness_score_is_the_choice_the_summed_log_likelihoods_make():
    model, tokenizer = load_model("builtin:tiny-llama", seed=0).eval(), char_tokenizer()
    score, report = evaluate_harness(model, tokenizer, UPPER_MC, batch_size=8)
    docs = [json.loads(line) for line in (TASKS / "upper_mc.jsonl").read_text().splitlines()]
    by_hand = [[loglikelihood(model, tokenizer, d["question"], c) for c in d["choices"]] for d in docs]
    chosen = [max(range(len(s)), key=s.__getitem__) for s in by_hand]
    assert score == pytest.approx(sum(c == d["answer"] for c, d in zip(chosen, docs, strict=True)) / len(docs))
    assert 0 < score < 1, "a random model neither always nor never picks the upper-cased word"
    samples = sorted(report["samples"]["upper_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) == report["results"]["upper_mc"]["sample_len"]
    for sample, scores in zip(samples, by_hand, strict=True):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(scores, abs=1e-3)  # [[loglik, greedy]] per choice


def test_limit_takes_the_first_documents():
    model = load_model("builtin:tiny-llama", seed=0).eval()
    column = HarnessColumn("upper_mc", limit=5, include_path=str(TASKS))
    _, report = evaluate_harness(model, char_tokenizer(), column, 8)
    assert report["results"]["upper_mc"]["sample_len"] == 5


def test_the_preflight_names_a_misspelled_task_a_wrong_metric_and_a_task_needing_the_network():
    problems = check_columns({
        "mine": HarnessColumn("upper_mcq", include_path=str(TASKS)),
        "norm": HarnessColumn("upper_mc", metric="acc_norm", include_path=str(TASKS)),
        "arc": HarnessColumn("arc_easy"),
        "ok": UPPER_MC,
    })
    assert len(problems) == 3, problems
    assert problems[0].startswith("domains.mine.source.harness: 'upper_mcq' is not an lm-evaluation-harness task; "
                                  "did you mean 'upper_mc'")
    assert problems[1] == "domains.norm.source.metric: task 'upper_mc' reports acc, not 'acc_norm'"
    assert problems[2].startswith("domains.arc.source.harness: task 'arc_easy' cannot load its data offline")
    assert "include_path" in problems[2]
