"""Memory per worker, estimated before anything starts, from the model's shapes, the parameters
a method trains, the precision and the strategy. Plain arithmetic: no torch allocation, no Ray.

With P parameters of which T train (a frozen tensor has no gradient and no AdamW state; a
masked one has both, whole), in bytes, for w bytes per weight (4 fp32 and bf16-mixed, 2 bf16),
on each of N workers (N = the workers under fsdp, else 1):

    weights W = P w / N  (+ 2 gathered decoder layers under fsdp)
    gradients G = T w / N;  AdamW state S = 2 T w / N (3 T w / N with bf16's Kahan buffer);  AdamW's step
    temporaries O = T w / N
    activations A (below);  DDP's gradient buckets B = G with more than one worker
    peak = max(W + G + S + O + B,   the optimizer step
               W + S + A)           the start of the backward pass (+ bf16 copies under bf16-mixed)

A, for t tokens per worker and forward pass (its micro-batch x max_length), L layers of hidden size h and
feed-forward size i, a vocabulary of V, and a bytes per activation (2 under bf16 and
bf16-mixed, 4 fp32): each layer keeps t (11 h + 3.4 i) a bytes for its backward pass, the loss
t V (a + 12) bytes (the logits and three float32 copies: upcast, softmax, gradient). With
gradient checkpointing a layer keeps only its input (t h a) and one layer is recomputed at a
time. The constants were fitted to FFT peaks measured on an H200 (SmolLM2-135M, Llama-3.2-1B,
Llama-2-7B, pure bf16); tests/core/test_memory.py holds the estimate to 15% of the measured peaks
the fit did not see (FFT of Llama-2-13B with checkpointing, FFT of 17.6B and 21.5B out of memory,
HFT at all six shapes) and, as a regression guard only, to 5% of the three it was fitted to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

GiB = 2**30
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "bf16-mixed": 4}
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "bf16-mixed": 2}
PER_HIDDEN, PER_INTERMEDIATE, LOGIT_COPIES_BYTES = 11.0, 3.4, 12


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs of a model."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    largest_layer: int         # parameters of one decoder layer (an FSDP unit, gathered whole)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Shapes:
        """From a transformers causal LM (on the meta device is enough)."""
        config = model.config
        hidden = config.hidden_size
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        unique = {id(p): p.numel() for p in model.parameters()}  # a tied embedding counts once
        return cls(sum(unique.values()), config.num_hidden_layers, hidden, intermediate, config.vocab_size,
                   max((sum(p.numel() for p in m.parameters()) for m in layers), default=0))


@dataclass(frozen=True)
class Setup:
    precision: str = "bf16"
    strategy: str = "ddp"
    workers: int = 1
    batch_size: int = 8        # sequences in one forward pass, over every worker (a micro-batch each)
    max_length: int = 1024
    gradient_checkpointing: bool = False
    kahan: bool = False        # pure bf16 with a compensation buffer per trained weight (train/compensated.py)


@dataclass(frozen=True)
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    step_temporaries: float    # AdamW's (and DDP's buckets)
    activations: float
    peak: float                # bytes

    def gib(self) -> dict[str, str]:
        """Each figure in GiB, to 3 significant digits."""
        return {k: f"{v / GiB:.3g}" for k, v in vars(self).items()}


def estimate(shapes: Shapes, trained: int, setup: Setup) -> Estimate:
    """Per-worker memory of training `trained` of `shapes.params` parameters under `setup`."""
    w, a = WEIGHT_BYTES[setup.precision], ACTIVATION_BYTES[setup.precision]
    sharded = setup.strategy == "fsdp" and setup.workers > 1
    n = setup.workers if sharded else 1
    weights = shapes.params * w / n + (2 * shapes.largest_layer * w if sharded else 0)
    moments = 3 if setup.kahan and setup.precision == "bf16" else 2  # AdamW's two, and Kahan's buffer
    gradients, state, temporaries = trained * w / n, moments * trained * w / n, trained * w / n
    if setup.strategy == "ddp" and setup.workers > 1:
        temporaries += gradients
    tokens = math.ceil(setup.batch_size / setup.workers) * setup.max_length
    layer = tokens * (PER_HIDDEN * shapes.hidden + PER_INTERMEDIATE * shapes.intermediate) * a
    kept = shapes.layers * tokens * shapes.hidden * a + layer if setup.gradient_checkpointing else shapes.layers * layer
    activations = kept + tokens * shapes.vocab * (a + LOGIT_COPIES_BYTES)
    casts = 2 * trained / n if setup.precision == "bf16-mixed" else 0  # autocast keeps bf16 copies for backward
    peak = max(weights + gradients + state + temporaries, weights + state + activations + casts)
    return Estimate(weights, gradients, state, temporaries, activations, peak)


def what_fits(shapes: Shapes, trained: int, setup: Setup, limit: float, hft_trained: int | None = None,
              max_workers: int = 8) -> list[str]:
    """The changes, one at a time, that bring the estimate under `limit` bytes."""
    candidates = []
    if setup.precision != "bf16":
        candidates.append(("train.precision: bf16", trained, replace(setup, precision="bf16")))
    if not setup.gradient_checkpointing:
        candidates.append(("train.gradient_checkpointing: true", trained,
                           replace(setup, gradient_checkpointing=True)))
    workers = setup.workers * 2
    while workers <= max_workers:
        candidates.append((f"train.strategy: fsdp with train.workers: {workers}", trained,
                           replace(setup, strategy="fsdp", workers=workers)))
        workers *= 2
    if setup.batch_size > setup.workers:  # one sequence per forward pass, the step's batch accumulated
        candidates.append(("train.micro_batch_size: 1", trained, replace(setup, batch_size=setup.workers)))
    if hft_trained is not None and hft_trained < trained:
        candidates.append(("kind: hft (half the model trains)", hft_trained, setup))
    fits = []
    for change, count, changed in candidates:
        peak = estimate(shapes, count, changed).peak
        if peak <= limit:
            fits.append(f"{change} ({peak / GiB:.1f} GiB)")
    return fits


def trained_params(model: torch.nn.Module, masks: dict | None) -> int:
    """Parameters with a gradient and AdamW state: every one for FFT (`masks` None); for a plan,
    each tensor with anything to train, whole (a masked tensor's gradient is whole)."""
    unique = {id(p): (n, p.numel()) for n, p in model.named_parameters()}
    if masks is None:
        return sum(numel for _, numel in unique.values())
    return sum(numel for name, numel in unique.values() if masks.get(name, True) is not False)


def adapter_params(model: torch.nn.Module, r: int) -> int:
    """LoRA's trainable parameters: r x (in + out) for every matrix of the decoder layers."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    return sum(r * sum(p.shape) for m in model.modules() if type(m).__name__ in blocks
               for p in m.parameters() if p.dim() == 2)
