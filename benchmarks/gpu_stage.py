"""A real stage on a GPU, through the project's own stage code (`hft_ray.train.stage.fit_stage`:
the method's plan and freezing, the optimizer over trainable parameters, the step loop with its
precision and gradient checkpointing), without Ray or MLflow, on random-init LLaMA shapes.

    python benchmarks/gpu_stage.py                    # SmolLM2-135M, Llama-3.2-1B, Llama-2-7B: FFT and HFT
                                                      # at each granularity, bf16, checkpointing off and on
    python benchmarks/gpu_stage.py --largest          # 13B, 17.6B, 21.5B with checkpointing, 1 x 1024 tokens:
                                                      # which shapes FFT and HFT fit
    python benchmarks/gpu_stage.py --smoke-test       # a tiny shape, 4 steps, on this machine's device

Per run: median step time over the timed steps (after `--warmup`), tokens/s, MFU (FFT's FLOPs,
6 x matmul parameters + 12 x layers x hidden x sequence per token, over the device's dense bf16
peak, so HFT's MFU reads as speed on the same work), peak memory (torch's allocator), the
estimate of hft_ray/core/memory.py beside it, and whether every frozen tensor is bitwise
unchanged after the timed steps (raw-bit checksums before and after). Needs torch and
transformers only (the GPU machine has no Ray, MLflow, pydantic or datasets). Writes
benchmarks/out/gpu_stage.json with the device's name.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import string
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from hft_ray.core.memory import GiB, Setup, Shapes, estimate, trained_params
from hft_ray.core.selection import select
from hft_ray.data.batching import part_of
from hft_ray.data.domains import Example
from hft_ray.train.job import BranchJob, StageJob, TrainSettings
from hft_ray.train.models import char_tokenizer
from hft_ray.train.runtime import start_runtime
from hft_ray.train.stage import fit_stage

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab, tied; batch, sequence
    "tiny": (64, 2, 128, 4, 2, 128, False, 2, 64),
    "SmolLM2-135M": (576, 30, 1536, 9, 3, 49152, True, 16, 1024),
    "Llama-3.2-1B": (2048, 16, 8192, 32, 8, 128256, True, 8, 1024),
    "Llama-2-7B": (4096, 32, 11008, 32, 32, 32000, False, 4, 1024),
    "Llama-2-13B": (5120, 40, 13824, 40, 40, 32000, False, 1, 1024),
    "17.6B": (6144, 44, 16384, 48, 8, 32000, False, 1, 1024),
    "21.5B": (6144, 54, 16384, 48, 8, 32000, False, 1, 1024),
}
METHODS = ("fft", "hft-category", "hft-layer", "hft-model", "hft-element")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense


class Quiet:
    """A channel that keeps nothing: no resumable checkpoints, no driver."""

    @contextlib.contextmanager
    def restored(self):
        yield None

    def save(self, write, name):
        pass

    def notify(self, event):
        pass


def random_model(name: str, device: torch.device) -> torch.nn.Module:
    hidden, layers, intermediate, heads, kv, vocab, tied = SHAPES[name][:7]
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      tie_word_embeddings=tied, attn_implementation="sdpa")
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def frozen_checksums(model: torch.nn.Module, masks: dict | None) -> dict[str, int]:
    """Raw-bit sums of every tensor's frozen entries (whole frozen tensors, and the entries a
    mask leaves out): any changed entry changes its sum (but for a crafted cancellation)."""
    sums = {}
    for name, param in model.named_parameters():
        mask = (masks or {}).get(name, True)
        if mask is True:
            continue
        frozen = param.detach() if mask is False else param.detach()[~mask.to(param.device)]
        sums[name] = int(frozen.view(torch.int16).sum(dtype=torch.int64))
    return sums


def run_one(name: str, method: str, checkpointing: bool, steps: int, warmup: int, device: torch.device) -> dict:
    batch, sequence = SHAPES[name][7:]
    row = {"shape": name, "method": method, "checkpointing": checkpointing, "tokens_per_step": batch * sequence}
    config = {"kind": "fft"} if method == "fft" else {"kind": "hft", "granularity": method[4:], "ratio": 0.5, "seed": 0}
    letters = random.Random(0)
    examples = tuple(Example("a", "".join(letters.choice(string.ascii_lowercase) for _ in range(sequence - 2)))
                     for _ in range(batch * 2))
    parts = (part_of(examples, char_tokenizer(), Path(tempfile.gettempdir()) / "hft-ray-bench-tokens",
                     max_length=sequence),)
    stage = StageJob(1, f"{name} {method}", parts, warmup + steps, 1e-5, 1, "", config)
    settings = TrainSettings(batch_size=batch, max_length=sequence, log_every=warmup + steps, precision="bf16",
                             gradient_checkpointing=checkpointing)
    job = BranchJob("bench", "", (stage,), settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        model = random_model(name, device)
        shapes = Shapes.of(model)
        masks = None if method == "fft" else select(model, method[4:], 0.5, 0, 1).param_masks()
        setup = Setup("bf16", batch_size=batch, max_length=sequence, gradient_checkpointing=checkpointing)
        row["estimate_gib"] = estimate(shapes, trained_params(model, masks), setup).peak / GiB
        before = frozen_checksums(model, masks)
        runtime = start_runtime(os.cpu_count() or 1)
        model = runtime.place(model, job)
        model, selection, log = fit_stage(model, char_tokenizer(), job, stage, runtime, Quiet())
    except torch.cuda.OutOfMemoryError:
        row["out_of_memory"] = True
        return row
    finally:
        gc.collect()
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
            torch.cuda.empty_cache()
    after = frozen_checksums(model, masks)
    row.update(step_s=statistics.median(log["step_times"][warmup:]), loss=log["losses"][-1],
               trained_fraction=log["trainable"] / log["total"], frozen_tensors=len(before),
               frozen_unchanged=before == after if before else "n/a",
               flops_per_token=6 * (shapes.params - (0 if SHAPES[name][6] else shapes.vocab * shapes.hidden))
               + 12 * shapes.layers * shapes.hidden * sequence)
    row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
    del model
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["SmolLM2-135M", "Llama-3.2-1B", "Llama-2-7B"],
                        choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--largest", action="store_true",
                        help="13B, 17.6B, 21.5B with checkpointing: FFT, HFT category")
    parser.add_argument("--smoke-test", action="store_true", help="the tiny shape, 4 steps: checks the script")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if args.smoke_test:
        args.shapes, args.steps, args.warmup, args.checkpointing = ["tiny"], 2, 2, "both"
    if args.largest:
        args.shapes, args.methods, args.checkpointing = ["Llama-2-13B", "17.6B", "21.5B"], ["fft", "hft-category"], "on"
    rows = []
    for shape in args.shapes:
        for checkpointing in {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]:
            for method in args.methods:
                row = run_one(shape, method, checkpointing, args.steps, args.warmup, device)
                if peak and "step_s" in row:
                    row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / (peak * 1e12)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "gpu_stage.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                    "transformers": transformers.__version__, "rows": rows}, indent=1))
    print(f"\n{name}, torch {torch.__version__}, transformers {transformers.__version__}, pure bf16 + AdamW")
    print("| shape | tokens/step | checkpointing | method | step s | vs FFT | tokens/s | MFU | peak GiB | vs FFT | "
          "estimate GiB | frozen unchanged |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fft = next((f for f in rows if f["shape"] == r["shape"] and f["checkpointing"] == r["checkpointing"]
                    and f["method"] == "fft"), r)
        if r.get("out_of_memory"):
            print(f"| {r['shape']} | {r['tokens_per_step']} | {r['checkpointing']} | {r['method']} | out of memory "
                  f"| | | | | | {r['estimate_gib']:.1f} | |")
            continue
        ratio = f"{r['step_s'] / fft['step_s']:.2f}" if "step_s" in fft else ""
        memory = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        memory_ratio = f"{r['peak_gib'] / fft['peak_gib']:.2f}" if "peak_gib" in r and "peak_gib" in fft else ""
        mfu = f"{r['mfu']:.2f}" if "mfu" in r else "-"
        print(f"| {r['shape']} | {r['tokens_per_step']} | {r['checkpointing']} | {r['method']} | {r['step_s']:.3f} | "
              f"{ratio} | {r['tokens_per_s']:.0f} | {mfu} | {memory} | {memory_ratio} | {r['estimate_gib']:.1f} | "
              f"{r['frozen_unchanged']} |")


if __name__ == "__main__":
    sys.exit(main())
