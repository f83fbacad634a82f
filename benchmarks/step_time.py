"""Step time and optimizer-state + gradient memory of full fine-tuning (FFT) vs Half
Fine-Tuning (HFT) at every granularity, in one process, on the same batch.

Each method gets its own copy of the same initial weights and its own AdamW. The methods
take turns, one training step each (round-robin), so machine noise falls on all of them
alike; after warm-up rounds we report the median step time per method.

    python benchmarks/step_time.py                       # tiny LLaMA and SmolLM2-135M
    python benchmarks/step_time.py --smoke-test          # tiny LLaMA, a few steps
    python benchmarks/step_time.py --models tiny-llama --steps 50
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from hft_ray.core.freezing import apply_plan
from hft_ray.core.selection import GRANULARITIES, select
from hft_ray.train.models import load_model

# model -> (source, batch size, sequence length, warm-up rounds, timed rounds)
MODELS = {
    "tiny-llama": ("builtin:tiny-llama", 32, 64, 5, 30),
    "smollm2-135m": ("builtin:smollm2-135m", 4, 128, 2, 10),
}
METHODS = ("fft",) + tuple(f"hft-{g}" for g in GRANULARITIES)
OUT = Path(__file__).parent / "out" / "step_time.json"


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def matmul_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of every nn.Linear, each once. The embedding lookup costs no matmul FLOPs,
    but a tied lm_head (SmolLM2) is an nn.Linear whose weight is the embedding matrix."""
    seen: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            seen.setdefault(id(module.weight), module.weight)
    return list(seen.values())


def flop_ratio(model: torch.nn.Module) -> float:
    """FLOP model of HFT/FFT step cost, with the plan already applied to `model`.

    Forward costs F, backward 2F: the input gradients dX (F, always needed because the
    always-trained embedding sits below every layer) and the weight gradients dW (F, skipped
    for frozen weights). Every matmul weight costs 2 * numel FLOPs per token, so the share of
    dW still computed is the share of matmul-weight entries with requires_grad. An element
    mask keeps requires_grad (full gradient, then masked), so its ratio is 1.0. Attention
    score matmuls, norms, activations, the loss and the optimizer are left out."""
    weights = matmul_weights(model)
    computed = sum(w.numel() for w in weights if w.requires_grad) / sum(w.numel() for w in weights)
    return (2.0 + computed) / 3.0


def build(base: torch.nn.Module, method: str, lr: float = 1e-4) -> dict:
    """A fresh copy of `base` set up for `method`, with its AdamW and the plan's bookkeeping."""
    model = copy.deepcopy(base).train()
    entry = {"method": method, "model": model, "trained_fraction": 1.0, "plan_bytes": 0}
    if method == "fft":
        params = model.parameters()
    else:
        plan = select(model, granularity=method.removeprefix("hft-"), ratio=0.5, seed=0, stage=0)
        applied = apply_plan(model, plan)
        params = applied.trainable_parameters()
        entry["trained_fraction"] = plan.fractions()["by_params"]["overall"]
        entry["plan_bytes"] = tensor_bytes([*applied._frozen_values.values(), *applied._frozen_masks.values()])
        entry["applied"] = applied  # keeps the hooks' owner alive
    entry["optimizer"] = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if method != "fft":
        applied.attach(entry["optimizer"])
    entry["flop_ratio"] = flop_ratio(model)
    return entry


def train_step(entry: dict, batch: torch.Tensor, measure: bool = False) -> float:
    """One forward + backward + optimizer step + zero_grad; returns seconds. With `measure`,
    also records the bytes of gradients and optimizer state just before zero_grad (that
    bookkeeping's time is excluded from the returned seconds)."""
    model, optimizer = entry["model"], entry["optimizer"]
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    elapsed = time.perf_counter() - start
    if measure:
        entry["grad_bytes"] = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        entry["optimizer_bytes"] = tensor_bytes(v for state in optimizer.state.values() for v in state.values())
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    return elapsed + time.perf_counter() - start


def bench_model(name: str, warmup: int | None, steps: int | None) -> dict:
    """All methods on one model, interleaved step by step; returns one row per method."""
    source, batch_size, seq_len, default_warmup, default_steps = MODELS[name]
    warmup, steps = warmup if warmup is not None else default_warmup, steps if steps is not None else default_steps
    t0 = time.perf_counter()
    base = load_model(source, seed=0)
    print(f"\n== {name}: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params, loaded in "
          f"{time.perf_counter() - t0:.1f} s; batch {batch_size} x {seq_len}, {warmup} warm-up + {steps} timed rounds")
    entries = [build(base, method) for method in METHODS]
    del base
    batch = torch.randint(0, entries[0]["model"].config.vocab_size, (batch_size, seq_len),
                          generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for round_index in range(warmup + steps):
        for entry in entries:
            seconds = train_step(entry, batch, measure=round_index == warmup - 1 or (warmup == 0 and round_index == 0))
            if round_index >= warmup:
                times[entry["method"]].append(seconds)
        print(f"  round {round_index + 1}/{warmup + steps}: {time.perf_counter() - t0:.0f} s elapsed", file=sys.stderr)
    rows = []
    for entry in entries:
        rows.append({key: entry[key] for key in ("method", "trained_fraction", "flop_ratio", "grad_bytes",
                                                  "optimizer_bytes", "plan_bytes")}
                    | {"median_step_s": statistics.median(times[entry["method"]]),
                       "step_times_s": times[entry["method"]]})
    fft = rows[0]
    for row in rows:
        row["step_ratio"] = row["median_step_s"] / fft["median_step_s"]
        # Same-round ratios cancel noise that lasts longer than one round (another job starting).
        pairs = zip(row["step_times_s"], fft["step_times_s"], strict=True)
        row["paired_step_ratio"] = statistics.median(t / f for t, f in pairs)
        row["memory_ratio"] = ((row["grad_bytes"] + row["optimizer_bytes"])
                               / (fft["grad_bytes"] + fft["optimizer_bytes"]))
    return {"model": name, "source": source, "batch": [batch_size, seq_len], "warmup": warmup, "steps": steps,
            "rows": rows}


def print_table(result: dict) -> None:
    header = ("method", "median step s", "vs FFT", "paired vs FFT", "FLOP model", "grads+optim MB", "vs FFT",
              "plan MB", "trained (params)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in result["rows"]:
        mb = (r["grad_bytes"] + r["optimizer_bytes"]) / 2**20
        print(f"| {r['method']} | {r['median_step_s']:.4f} | {r['step_ratio']:.3f} | {r['paired_step_ratio']:.3f} | "
              f"{r['flop_ratio']:.3f} | {mb:.1f} | {r['memory_ratio']:.3f} | {r['plan_bytes'] / 2**20:.1f} | "
              f"{r['trained_fraction']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default: per model)")
    parser.add_argument("--steps", type=int, help="timed rounds (default: per model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormal floats to zero "
                             "(on x86 CPUs they make every step several times slower)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny LLaMA only, 1 warm-up + 3 timed rounds")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.smoke_test:
        args.models = ["tiny-llama"]
        args.warmup, args.steps = args.warmup or 1, args.steps or 3
    torch.set_num_threads(args.threads)
    # Adam's second moments and small gradients underflow into denormal floats, which x86 CPUs
    # handle in microcode: without flushing them, they, not matmuls, dominate the step time.
    flush = not args.keep_denormals and torch.set_flush_denormal(True)
    print(f"threads {args.threads}, flush denormals: {flush}")
    results = []
    for name in args.models:
        results.append(bench_model(name, args.warmup, args.steps))
        print_table(results[-1])
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"\nwhole-process peak RSS (all methods together, not separable): {peak_rss_mb:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "flush_denormal": flush, "torch": torch.__version__,
                                    "peak_rss_mb": peak_rss_mb, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
