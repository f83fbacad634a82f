"""LoRA baseline: only adapters train, and the merged checkpoint evaluates as the adapted model."""

import pytest
import torch

from hft_ray.data.encoding import batches, encode
from hft_ray.data.loading import load_domain
from hft_ray.train.checkpoints import load_checkpoint, write_checkpoint
from hft_ray.train.evaluation import evaluate
from hft_ray.train.loop import make_optimizer, run_steps
from hft_ray.train.methods.lora import attach_lora, merge_lora
from hft_ray.train.models import char_tokenizer, load_model


def test_lora_trains_adapters_only_and_merges_into_a_checkpoint_that_evaluates_the_same(tmp_path):
    model, tokenizer = load_model("builtin:tiny-llama", seed=0), char_tokenizer()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = load_domain("upper", "builtin:upper", seed=0, eval_size=32, train_size=256)
    adapted = attach_lora(model, r=4, alpha=8)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)
    optimizer, scheduler = make_optimizer(trainable, 3e-3, 0.0, 40)
    losses = run_steps(adapted, optimizer, scheduler, batches(encode(data.train, tokenizer, 32), 32, 0), 40)
    assert losses[-1] < losses[0]
    adapted.eval()
    before = evaluate(adapted, tokenizer, data.eval, max_new_tokens=8)
    probe = encode(data.eval[:8], tokenizer, 32)["input_ids"]
    with torch.no_grad():
        logits = adapted(input_ids=probe).logits

    merged = merge_lora(adapted)
    loaded, _ = load_checkpoint(write_checkpoint(tmp_path / "ckpt", merged, tokenizer))
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=probe).logits, logits, atol=1e-4)
    # the same answers; the graded scores to float rounding (merged weights are sums in another order)
    assert evaluate(loaded, tokenizer, data.eval, max_new_tokens=8) == pytest.approx(before, abs=1e-6)
    assert set(dict(loaded.named_parameters())) == set(base), "a plain model again, no adapter left"
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, base[n])]
    assert changed and all("embed" not in n and "norm" not in n for n in changed), "only the adapted linears moved"
