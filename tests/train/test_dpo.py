"""DPO: the loss is the formula, the log-probabilities are the model's, and training on a
preference domain raises reward accuracy, also under an HFT plan."""

import math

import pytest
import torch

from hft_ray.core.freezing import apply_plan
from hft_ray.core.selection import select
from hft_ray.data.encoding import batches
from hft_ray.data.loading import load_domain
from hft_ray.train.dpo import (
    Preference,
    dpo_loss,
    dpo_step_loss,
    encode_pairs,
    reward_accuracy,
    sequence_logps,
    with_reference,
)
from hft_ray.train.loop import make_optimizer, run_steps
from hft_ray.train.models import char_tokenizer, load_model


def test_the_loss_is_the_dpo_formula_on_a_hand_built_example():
    # margin = (-1 - -2) - (-3 - -2) = 2; beta 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # A batch is the mean; a policy equal to the reference gives log 2.
    same = dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.1)
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)


def test_sequence_logps_sum_the_answer_tokens_only():
    model, tokenizer = load_model("builtin:tiny-llama", seed=0).eval(), char_tokenizer()
    batch = encode_pairs([Preference("V ab=", "bc", "za")], tokenizer, 32)
    got = sequence_logps(model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    ids = batch["chosen_input_ids"][0].tolist()
    prompt_len = len(tokenizer("V ab=", add_special_tokens=True)["input_ids"])
    with torch.no_grad():
        logps = model(input_ids=batch["chosen_input_ids"]).logits[0].log_softmax(-1)
    # "bc" + EOS: positions prompt_len .. prompt_len + 2, each predicted from the position before.
    expected = sum(logps[pos - 1, ids[pos]].item() for pos in range(prompt_len, prompt_len + 3))
    assert got.item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("hft", [False, True], ids=["fft", "hft"])
def test_dpo_training_raises_reward_accuracy(hft):
    torch.manual_seed(0)
    data = load_domain("prefer", "builtin:prefer", seed=0, eval_size=64)
    model, tokenizer = load_model("builtin:tiny-llama", seed=0), char_tokenizer()
    before = reward_accuracy(model, tokenizer, data.eval)
    applied = apply_plan(model, select(model, "category", 0.5, seed=0)) if hft else None
    params = applied.trainable_parameters() if applied else list(model.parameters())
    optimizer, scheduler = make_optimizer(params, 3e-3, 0.0, 60)
    if applied:
        applied.attach(optimizer)
    encoded = with_reference(model, encode_pairs(data.train, tokenizer, 32))
    losses = run_steps(model, optimizer, scheduler, batches(encoded, 32, 0), 60, loss_fn=dpo_step_loss(0.5))
    after = reward_accuracy(model, tokenizer, data.eval)
    assert losses[-1] < losses[0]
    assert before < 0.75 and after >= 0.9, (before, after)


def test_the_builtin_preference_domain_holds_out_unseen_prompts():
    data = load_domain("prefer", "builtin:prefer", seed=0, eval_size=20)
    assert all(isinstance(p, Preference) and p.chosen != p.rejected for p in data.train + data.eval)
    assert not {p.prompt for p in data.eval} & {p.prompt for p in data.train}
    assert len(data.eval) == 20 and len({p.prompt for p in data.train}) == len(data.train)
