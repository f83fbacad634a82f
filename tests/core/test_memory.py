"""The memory estimate against the peaks measured on an H200 by the session that filed issue 14
(pure bf16, AdamW, the package's own select/apply_plan/make_optimizer, random-init LLaMA shapes).
These are the only measured peaks there are (README "Large models"); no GPU measured any here.

The estimate's constants were fitted to three of them, the FFT peaks of SmolLM2-135M, Llama-3.2-1B
and Llama-2-7B (hft_ray/core/memory.py): those rows cannot test its accuracy, only that the fit
still reproduces its own data (a regression guard, to 5%). The accuracy test, to 15%, is on the
rows the fit did not see: FFT of Llama-2-13B with checkpointing, FFT of 17.6B and 21.5B (out of
memory on 139 GiB), and every HFT peak. Of these, the HFT rows of SmolLM2-135M and Llama-3.2-1B
are held out only weakly: their estimate is mostly the activation term the fit set (HFT moves it by
1%); activations are half of the 7B HFT estimate; the checkpointed rows (13B and up) rest on the
parameter arithmetic alone (activations under 1.5 GiB), so they cannot tell checkpointing's own
term right from wrong (test_sharding_precision_and_checkpointing_cut_what_they_should checks it).

HFT is one plan, seed 0 of stage 1, as benchmarks/gpu_stage.py draws it. Which draw issue 14
measured is not recorded; with grouped-query attention the draws differ (seeds 0-3, stages 0-1:
the 17.6B and 21.5B estimates span 98.9-101.0 and 120.4-123.0 GiB), within 2.1% of one another."""

import pytest
import torch
import transformers

from hft_ray.core.memory import GiB, Setup, Shapes, estimate, trained_params, what_fits
from hft_ray.core.selection import select

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings
    "SmolLM2-135M": (576, 30, 1536, 9, 3, 49152, True),
    "Llama-3.2-1B": (2048, 16, 8192, 32, 8, 128256, True),
    "Llama-2-7B": (4096, 32, 11008, 32, 32, 32000, False),
    "Llama-2-13B": (5120, 40, 13824, 40, 40, 32000, False),
    "17.6B": (6144, 44, 16384, 48, 8, 32000, False),
    "21.5B": (6144, 54, 16384, 48, 8, 32000, False),
}
SETUPS = {  # batch, sequence, gradient checkpointing
    "SmolLM2-135M": (16, 1024, False),
    "Llama-3.2-1B": (8, 1024, False),
    "Llama-2-7B": (4, 1024, False),
    "Llama-2-13B": (1, 1024, True),
    "17.6B": (1, 1024, True),
    "21.5B": (1, 1024, True),
}
H200 = 139  # GiB
# Peaks in GiB (issue 14, README "Large models"); None: out of memory on the H200. The small
# shapes' HFT peaks were reported as a fraction of the FFT peak.
FFT_FITTED = {"SmolLM2-135M": 21.2, "Llama-3.2-1B": 32.1, "Llama-2-7B": 62.8}  # the constants' own data
FFT_HELD_OUT = {"Llama-2-13B": 121.9, "17.6B": None, "21.5B": None}
HFT_HELD_OUT = {"SmolLM2-135M": 0.92 * 21.2, "Llama-3.2-1B": 0.90 * 32.1, "Llama-2-7B": 0.75 * 62.8,
                "Llama-2-13B": 74.4, "17.6B": 98.9, "21.5B": 120.5}
HFT_SEED, HFT_STAGE = 0, 1


def meta_llama(name: str) -> torch.nn.Module:
    hidden, layers, intermediate, heads, kv, vocab, tied = SHAPES[name]
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      tie_word_embeddings=tied)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def estimated_gib(name: str, method: str) -> float:
    model = meta_llama(name)
    batch, sequence, checkpointing = SETUPS[name]
    setup = Setup(precision="bf16", batch_size=batch, max_length=sequence, gradient_checkpointing=checkpointing)
    masks = None if method == "fft" else select(model, "category", 0.5, HFT_SEED, HFT_STAGE).param_masks()
    return estimate(Shapes.of(model), trained_params(model, masks), setup).peak / GiB


@pytest.mark.parametrize("name", list(FFT_FITTED))
def test_regression_guard_the_fit_still_reproduces_the_ffts_peaks_it_was_fitted_to(name):
    """Not an accuracy test: these peaks set the constants. Within 5% (2.8% at most when fitted)."""
    fft = estimated_gib(name, "fft")
    assert abs(fft - FFT_FITTED[name]) / FFT_FITTED[name] <= 0.05, (name, fft, FFT_FITTED[name])


@pytest.mark.parametrize("name", list(FFT_HELD_OUT))
def test_held_out_fft_peaks_are_within_15_percent_or_out_of_memory_as_measured(name):
    fft, measured = estimated_gib(name, "fft"), FFT_HELD_OUT[name]
    if measured is None:
        assert fft > H200, f"{name}: FFT did not fit an H200 ({H200} GiB); the estimate says {fft:.1f} GiB"
    else:
        assert abs(fft - measured) / measured <= 0.15, (name, fft, measured)


@pytest.mark.parametrize("name", list(HFT_HELD_OUT))
def test_held_out_hft_peaks_are_within_15_percent(name):
    hft, measured = estimated_gib(name, "hft"), HFT_HELD_OUT[name]
    assert abs(hft - measured) / measured <= 0.15, (name, hft, measured)


def test_it_says_ffts_of_the_17_6b_shape_does_not_fit_an_h200_and_hft_does_and_what_would_make_fft_fit():
    model = meta_llama("17.6B")
    shapes, setup = Shapes.of(model), Setup(precision="bf16", batch_size=1, max_length=1024,
                                            gradient_checkpointing=True)
    hft = trained_params(model, select(model, "category", 0.5, 0, 1).param_masks())
    full = trained_params(model, None)
    assert estimate(shapes, full, setup).peak > 139 * GiB > estimate(shapes, hft, setup).peak
    fits = what_fits(shapes, full, setup, 139 * GiB, hft_trained=hft)
    assert any(f.startswith("train.strategy: fsdp with train.workers: 2") for f in fits)
    assert any(f.startswith("kind: hft") for f in fits)


def test_sharding_precision_and_checkpointing_cut_what_they_should():
    model = meta_llama("Llama-2-7B")
    shapes, full = Shapes.of(model), trained_params(model, None)
    base = estimate(shapes, full, Setup(precision="fp32", batch_size=4, max_length=1024))
    bf16 = estimate(shapes, full, Setup(precision="bf16", batch_size=4, max_length=1024))
    assert bf16.weights == base.weights / 2 and bf16.optimizer == base.optimizer / 2
    fsdp = estimate(shapes, full, Setup(precision="bf16", strategy="fsdp", workers=4, batch_size=4, max_length=1024))
    assert fsdp.optimizer == bf16.optimizer / 4 and fsdp.activations < bf16.activations
    checkpointed = estimate(shapes, full, Setup(precision="bf16", batch_size=4, max_length=1024,
                                                gradient_checkpointing=True))
    assert checkpointed.activations < bf16.activations / 4
    kahan = estimate(shapes, full, Setup(precision="bf16", batch_size=4, max_length=1024, kahan=True))
    assert kahan.optimizer == 1.5 * bf16.optimizer, "the compensation buffer: one bf16 value per trained weight"
