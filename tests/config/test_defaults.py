"""Defaults that suit the model: a built-in tiny model keeps the rates and lengths it trains with
from scratch; a pretrained one gets fine-tuning values, said at the start, and a warning for a
rate that would rewrite it."""

import pytest

from hft_ray.config.model_defaults import REAL_MODEL_DEFAULTS, TINY_MODEL_DEFAULTS
from hft_ray.config.spec import parse_spec


def pipeline(source: str, train: dict | None = None, stage_lr: float | None = None) -> dict:
    stage = {"domain": "a", "steps": 1, **({"lr": stage_lr} if stage_lr else {})}
    return {"name": "p", "model": {"source": source}, "domains": {"a": {"source": "builtin:upper"}},
            "stages": [stage], "methods": {"fft": {"kind": "fft"}}, **({"train": train} if train else {})}


def chosen(spec) -> dict:
    return {"lr": spec.train.lr, "max_length": spec.train.max_length, "max_new_tokens": spec.eval.max_new_tokens}


@pytest.mark.parametrize("source", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_a_tiny_built_in_model_keeps_its_from_scratch_settings_silently(source):
    parse_spec(pipeline("Qwen/Qwen2.5-1.5B-Instruct"))  # filling a pretrained model's defaults leaks into no other spec
    spec = parse_spec(pipeline(source))
    assert chosen(spec) == TINY_MODEL_DEFAULTS and spec.notes == ()


@pytest.mark.parametrize("source", ["builtin:smollm2-135m", "Qwen/Qwen2.5-1.5B-Instruct", "/models/llama.gguf"])
def test_a_pretrained_model_gets_fine_tuning_defaults_and_says_so(source):
    spec = parse_spec(pipeline(source))
    assert chosen(spec) == REAL_MODEL_DEFAULTS == {"lr": 2e-5, "max_length": 2048, "max_new_tokens": 128}
    assert spec.notes == ("train.lr: 2e-05 (the default for a pretrained model)",
                          "train.max_length: 2048 (the default for a pretrained model)",
                          "eval.max_new_tokens: 128 (the default for a pretrained model)")


def test_what_the_file_sets_wins_and_a_destructive_rate_is_named():
    spec = parse_spec(pipeline("builtin:smollm2-135m", {"lr": 3e-3, "max_length": 512}, stage_lr=5e-3))
    assert (spec.train.lr, spec.train.max_length, spec.eval.max_new_tokens) == (3e-3, 512, 128)
    warnings = [n for n in spec.notes if n.startswith("warning")]
    assert [w.split(":")[1].strip() for w in warnings] == ["train.lr", "stages.0.lr"]
    assert "above 1e-3" in warnings[0]
    assert parse_spec(pipeline("builtin:tiny-llama", {"lr": 3e-3})).notes == (), "tiny models train at such rates"
