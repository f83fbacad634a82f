"""HFT inside a plain transformers.Trainer, through HFTCallback."""

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hft_ray.core.hf_callback import HFTCallback
from hft_ray.train.models import load_model


def _dataset(rows=32, length=12):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (rows, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _trainer(tmp_path, model, callback, epochs=1):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=epochs,
                             learning_rate=5e-2, weight_decay=0.1, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[callback])


def test_trainer_trains_only_the_selected_half(tmp_path):
    model = load_model("builtin:tiny-qwen2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = HFTCallback(granularity="element", ratio=0.5, seed=0)  # masks + weight decay: the hard case
    trainer = _trainer(tmp_path, model, callback)
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    masks = callback.plans[0].param_masks()
    for name, param in model.named_parameters():
        mask = masks[name]
        trained = torch.ones_like(param, dtype=torch.bool) if mask is True else mask
        assert torch.equal(param[~trained], before[name][~trained]), name
        assert not torch.equal(param[trained], before[name][trained]), name


def test_reselecting_every_epoch_draws_a_new_plan_and_freezes_per_plan(tmp_path):
    model = load_model("builtin:tiny-llama")
    snapshots = []

    class Snapshot(HFTCallback):
        def on_epoch_begin(self, args, state, control, model=None, **kwargs):
            super().on_epoch_begin(args, state, control, model=model, **kwargs)
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    callback = Snapshot(granularity="category", reselect_every_epoch=True)
    _trainer(tmp_path, model, callback, epochs=2).train()
    assert len(callback.plans) == 2 and callback.plans[0].trained != callback.plans[1].trained
    # During epoch 1 (the second), tensors frozen by the second plan did not move.
    after = dict(model.named_parameters())
    masks = callback.plans[1].param_masks()
    frozen = [n for n, m in masks.items() if m is False]
    assert frozen and all(torch.equal(after[n], snapshots[1][n]) for n in frozen)
    moved = [n for n, m in masks.items() if m is True and not torch.equal(after[n], snapshots[1][n])]
    assert len(moved) == sum(m is True for m in masks.values())
