"""Direct Preference Optimization (Rafailov et al. 2023) for preference domains: plain torch.

A preference example is (prompt, chosen, rejected). The policy is trained so that, relative to
the reference model (the stage's starting checkpoint), it raises the likelihood of `chosen` over
`rejected`:

    loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

with log pi(y) the summed log-probability of the answer's tokens (and EOS) given the prompt.
The reference's log-probabilities are computed once before training (`with_reference`), so no
second model is held in memory. A preference domain is scored by reward accuracy: the share of
pairs where the model itself gives `chosen` the higher log-probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hft_ray.data.chat import as_chat
from hft_ray.data.domains import Example, Preference
from hft_ray.data.encoding import IGNORE_INDEX, encode


def encode_pairs(pairs: Sequence[Preference], tokenizer, max_length: int, *,
                 domain: str = "?") -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* tensors (input_ids, attention_mask, labels), row i = pair i."""
    def answered(pair: Preference, answer: str) -> Example:
        return as_chat(Example(pair.prompt, answer)) if pair.chat else Example(pair.prompt, answer)

    chosen = encode([answered(p, p.chosen) for p in pairs], tokenizer, max_length, domain=domain)
    rejected = encode([answered(p, p.rejected) for p in pairs], tokenizer, max_length, domain=domain)
    return {**{f"chosen_{k}": v for k, v in chosen.items()}, **{f"rejected_{k}": v for k, v in rejected.items()}}


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (the answer and its EOS)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * scored).sum(-1)


def pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = sequence_logps(model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    rejected = sequence_logps(model, batch["rejected_input_ids"], batch["rejected_attention_mask"],
                              batch["rejected_labels"])
    return chosen, rejected


@torch.no_grad()
def bounded_pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_logps` without gradients, in slices of rows whose logits fit the evaluation budget
    (hft_ray/train/evaluation.py `rows_per_pass`)."""
    from hft_ray.train.evaluation import rows_per_pass

    vocab = model.get_output_embeddings().weight.shape[0]
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    rows = batch["chosen_input_ids"].shape[0]
    per_pass = rows_per_pass(width, vocab)
    parts = [pair_logps(model, {k: v[start:start + per_pass] for k, v in batch.items()})
             for start in range(0, rows, per_pass)]
    return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The mean DPO loss over a batch of pairs (the formula in the module docstring)."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()


@torch.no_grad()
def with_reference(model, encoded: dict[str, torch.Tensor], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """`encoded` plus reference_chosen / reference_rejected: `model`'s log-probabilities now."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = encoded["chosen_input_ids"].shape[0]
    chosen, rejected = [], []
    for start in range(0, rows, batch_size):  # a batch at a time on the device; the pairs stay where they are
        part = {k: v[start:start + batch_size].to(device) for k, v in encoded.items()}
        c, r = bounded_pair_logps(model, part)
        chosen.append(c.to(encoded["chosen_input_ids"].device))
        rejected.append(r.to(encoded["chosen_input_ids"].device))
    model.train(was_training)
    return {**encoded, "reference_chosen": torch.cat(chosen), "reference_rejected": torch.cat(rejected)}


def dpo_step_loss(beta: float):
    """A `loss_fn(model, batch)` for the training loop, on batches of `with_reference` data."""
    def loss_fn(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = pair_logps(model, batch)
        loss = dpo_loss(chosen, rejected, batch["reference_chosen"], batch["reference_rejected"], beta)
        return loss * batch.get("share", 1.0)  # a micro-batch's part of the step's mean
    return loss_fn


@torch.no_grad()
def reward_accuracy(model, tokenizer, pairs: Sequence[Preference], *, batch_size: int = 64) -> float:
    """Share of pairs where the model gives `chosen` a higher log-probability than `rejected`."""
    if not pairs:
        return 0.0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    for start in range(0, len(pairs), batch_size):
        batch = encode_pairs(pairs[start:start + batch_size], tokenizer, max_length=1 << 30, domain="eval")
        chosen, rejected = bounded_pair_logps(model, {k: v.to(device) for k, v in batch.items()})
        wins += int((chosen > rejected).sum())
    model.train(was_training)
    return wins / len(pairs)
