"""Frozen entries stay bitwise unchanged through AdamW with weight decay; trained ones move."""

import pytest
import torch

from hft_ray.core.freezing import apply_plan
from hft_ray.core.half_reset import half_reset
from hft_ray.core.selection import GRANULARITIES, select
from hft_ray.train.models import load_model
from hft_ray.train.precision import autocast, cast

CASES = [("tiny-llama", g) for g in GRANULARITIES] + [
    (arch, g) for arch in ("tiny-gpt2", "tiny-gpt-neox", "tiny-phi3", "tiny-qwen2") for g in ("category", "element")
]


def _train(model, applied=None, steps=12, lr=5e-2, precision="fp32"):
    """AdamW with weight decay and gradient clipping; full fine-tuning when `applied` is None."""
    params = list(model.parameters() if applied is None else applied.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    if applied is not None:
        applied.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(4, model.config.vocab_size, (4, 12), generator=generator)
        with autocast(precision, torch.device("cpu")):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


PRECISION_CASES = [("tiny-llama", g, p) for g in ("category", "element") for p in ("bf16", "bf16-mixed")] + [
    ("tiny-gpt2", "category", "bf16")]


@pytest.mark.parametrize("arch,granularity,precision", [(a, g, "fp32") for a, g in CASES] + PRECISION_CASES)
def test_frozen_entries_stay_bitwise_unchanged_and_trained_ones_move(arch, granularity, precision):
    model = cast(load_model(f"builtin:{arch}", seed=0), precision)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = select(model, granularity, 0.5, seed=1)
    applied = apply_plan(model, plan)
    optimizer = _train(model, applied, precision=precision)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16 if precision == "bf16" else torch.float32}

    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    masks = plan.param_masks()
    partial = 0
    for name, param in model.named_parameters():
        mask = masks[name]
        if mask is False:
            assert torch.equal(param, before[name]), f"{name} frozen but changed"
            assert id(param) not in in_optimizer, f"{name} frozen but given to the optimizer"
            continue
        trained = torch.ones_like(param, dtype=torch.bool) if mask is True else mask
        partial += mask is not True
        assert torch.equal(param[~trained], before[name][~trained]), f"{name}: frozen entries changed"
        moved = (param[trained] != before[name][trained]).float().mean()
        assert moved > 0.5, f"{name}: only {moved:.0%} of trained entries moved"
    if granularity == "element" or (granularity == "category" and arch in ("tiny-gpt2", "tiny-gpt-neox", "tiny-phi3")):
        assert partial > 0, "expected masked (partly trained) tensors in this case"


def test_optimizer_state_exists_only_for_trainable_tensors():
    model = load_model("builtin:tiny-llama")
    applied = apply_plan(model, select(model, "category", 0.5))
    optimizer = _train(model, applied, steps=2)
    state_numel = sum(s["exp_avg"].numel() for s in optimizer.state.values())
    assert state_numel == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert state_numel < 0.6 * sum(p.numel() for p in model.parameters())


def test_remove_makes_everything_trainable_again():
    model = load_model("builtin:tiny-gpt2")
    applied = apply_plan(model, select(model, "category", 0.5))
    assert not all(p.requires_grad for p in model.parameters())
    applied.remove()
    ids = torch.randint(4, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("granularity", ["category", "element"])
def test_half_reset_restores_exactly_the_selected_half(granularity):
    model = load_model("builtin:tiny-phi3", seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, steps=3)
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = select(model, granularity, 0.5, seed=4)
    reset = half_reset(model, base, plan)
    expected = 0
    masks = plan.param_masks()
    for name, param in model.named_parameters():
        mask = masks[name]
        selected = torch.full_like(param, bool(mask), dtype=torch.bool) if isinstance(mask, bool) else mask
        expected += int(selected.sum())
        assert torch.equal(param[selected], base[name][selected])
        assert torch.equal(param[~selected], tuned[name][~selected])
    assert reset == expected and 0 < reset < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("granularity", ["category", "element"])
def test_periodic_reselection_draws_a_new_plan_every_k_steps_and_keeps_each_periods_frozen_entries(granularity):
    from hft_ray.core.freezing import PeriodicSelection
    from hft_ray.data.encoding import batches, encode
    from hft_ray.data.loading import load_domain
    from hft_ray.train.loop import make_optimizer, run_steps
    from hft_ray.train.models import char_tokenizer

    model = load_model("builtin:tiny-llama", seed=0)
    data = encode(load_domain("u", "builtin:upper", seed=0, eval_size=8, train_size=128).train, char_tokenizer(), 32)
    optimizer, scheduler = make_optimizer(model.parameters(), 1e-2, 0.1, 12)  # every parameter, weight decay on
    periodic = PeriodicSelection(model, select(model, granularity, 0.5, seed=0, stage=1), every=4, optimizer=optimizer)
    plans = [periodic.applied.plan]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step(step, loss):
        nonlocal start
        if step % 4:
            return
        moved = False
        for name, mask in plans[-1].param_masks().items():
            now, before = dict(model.named_parameters())[name].detach(), start[name]
            frozen = ~mask if isinstance(mask, torch.Tensor) else torch.full_like(now, not mask, dtype=torch.bool)
            assert torch.equal(now[frozen], before[frozen]), f"period {len(plans)}: {name} frozen entries moved"
            moved |= not torch.equal(now[~frozen], before[~frozen])
        assert moved, "the trained entries did train"
        periodic.after_step(step)
        plans.append(periodic.applied.plan)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}

    run_steps(model, optimizer, scheduler, batches(data, 16, 0), 12, on_step=on_step)
    assert [p.period for p in plans] == [0, 1, 2, 3]
    masks = [p.param_masks() for p in plans[:3]]
    assert masks[0] != masks[1] if granularity == "category" else any(
        not torch.equal(masks[0][n], masks[1][n]) for n in masks[0] if isinstance(masks[0][n], torch.Tensor))
    assert plans[0].trained == select(model, granularity, 0.5, seed=0, stage=1).trained, "period 0 is the stage's plan"
