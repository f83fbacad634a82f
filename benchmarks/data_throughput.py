"""How much of what a stage computes is real tokens, and how fast it trains them, under three
batchings of the same length-varied rows, side by side in one run:

    global   every row padded to the longest row of the dataset (hft-ray's batching before
             token files; kept here for the comparison)
    dynamic  each batch padded to its own longest row, rounded up to a multiple of 8
    packed   rows concatenated up to max_length, position_ids restarting at every row

Rows are drawn with lognormal token lengths (p50 ~303, p95 ~1,169 on SmolLM2's tokenizer, capped
at max_length), 30% prompt and 70% answer. For each model and mode: the useful share (real /
computed tokens) over the steps trained and over one whole epoch, and useful tokens trained per
second (FFT, fp32, the same optimizer steps in each mode, the first step not timed). Besides:
tokenization rows/s into a token folder (SmolLM2's chat template, and plain), and the peak RSS of
a process that reads batches from a 200k-row token folder as a rank does.

    python benchmarks/data_throughput.py                 # tiny LLaMA and SmolLM2, 200k-row RSS check
    python benchmarks/data_throughput.py --smoke-test    # tiny LLaMA, few rows and steps

Writes benchmarks/out/data_throughput.json (contract: {"modes": {mode: {"useful_share",
"useful_tokens_per_s"}}, "tokenize_rows_per_s", "rank_peak_rss_gb"}; the per-model figures beside).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hft_ray.data.batching import Part, Pool, collate, global_batches, useful_share
from hft_ray.data.chat import as_chat
from hft_ray.data.domains import Example
from hft_ray.data.encoding import pad_id
from hft_ray.data.tokens import tokenized
from hft_ray.storage import Location
from hft_ray.train.loop import make_optimizer, run_steps
from hft_ray.train.models import char_tokenizer, load_model, load_tokenizer

OUT = Path(__file__).parent / "out" / "data_throughput.json"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we can had has more will would so if out up about what").split()
# model -> (source, max_length, tokens per word: one char-token per letter and space on the built-in tokenizer)
MODELS = {"tiny-llama": ("builtin:tiny-llama", 256), "smollm2-135m": ("builtin:smollm2-135m", 2048)}
MODES = ("global", "dynamic", "packed")


def rows(count: int, scale: float, max_length: int, seed: int = 0) -> list[Example]:
    """`count` rows whose lengths follow the lognormal above, `scale` x on a tokenizer of shorter tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.exp(rng.normal(np.log(303 * scale), 0.821, count)), max_length * 0.95).astype(int)
    made = []
    for length in lengths:
        words = max(3, int(length / (4.5 if scale < 1 else 1.0)))
        text = rng.choice(WORDS, words)
        cut = max(1, int(words * 0.3))
        made.append(Example(" ".join(text[:cut]), " ".join(text[cut:])))
    return made


def mode_batches(pool: Pool, mode: str, batch_size: int, max_length: int, pad: int, steps: int
                 ) -> list[tuple[dict, int]]:
    """`steps` batches of `mode` (the same shuffle in every mode), each with its real tokens."""
    packed = mode == "packed"
    plans = global_batches(pool, seed=0, batch_size=batch_size, max_length=max_length, packing=packed)
    width = -(-int(pool.length.max()) // 8) * 8
    made = []
    for _ in range(steps):
        plan = next(plans)
        batch = collate(pool, plan, pad, packed=packed)
        if mode == "global":  # every row as wide as the dataset's longest
            fill = {"input_ids": pad, "labels": -100, "attention_mask": 0}
            batch = {k: torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill[k]) for k, v in batch.items()}
        made.append(({**batch, "use_cache": False}, int(sum(pool.length[i] for s in plan for i in s))))
    return made


def train_modes(name: str, source: str, max_length: int, count: int, batch_size: int, steps: int,
                folder: Path) -> dict:
    tokenizer = load_tokenizer(source) if not source.startswith("builtin:tiny") else char_tokenizer()
    scale = 1.0 if "smollm2" in source else 1 / 8
    where, _ = tokenized(rows(count, scale, max_length), tokenizer, Location(folder / "tokens"),
                         max_length=max_length, chat=False)
    pool = Pool([Part(where)])
    model = load_model(source, seed=0)
    torch.manual_seed(0)
    report = {"rows": len(pool), "max_length": max_length, "batch_size": batch_size, "steps": steps,
              "length_p50": int(np.percentile(pool.length, 50)), "length_p95": int(np.percentile(pool.length, 95))}
    for mode in MODES:
        made = mode_batches(pool, mode, batch_size, max_length, pad_id(tokenizer), steps + 1)
        batches = [batch for batch, _ in made]
        optimizer, scheduler = make_optimizer(model.parameters(), 1e-5, 0.0, steps + 1)
        run_steps(model, optimizer, scheduler, iter(batches[:1]), 1)  # warm-up, not timed
        started = time.perf_counter()
        run_steps(model, optimizer, scheduler, iter(batches[1:]), steps)
        seconds = time.perf_counter() - started
        real = sum(count for _, count in made[1:])
        computed = sum(batch["input_ids"].numel() for batch in batches[1:])
        epoch = (float(pool.length.sum()) / (len(pool) * -(-int(pool.length.max()) // 8) * 8) if mode == "global" else
                 useful_share(pool, seed=0, batch_size=batch_size, max_length=max_length, packing=mode == "packed"))
        report[mode] = {"useful_share": round(real / computed, 4), "useful_share_epoch": round(epoch, 4),
                        "useful_tokens_per_s": round(real / seconds, 1), "step_s": round(seconds / steps, 3)}
        print(f"{name} {mode}: useful share {real / computed:.3f} (epoch {epoch:.3f}), "
              f"{real / seconds:,.0f} useful tokens/s, {seconds / steps:.2f} s/step", flush=True)
    return report


def tokenize_speed(count: int, folder: Path) -> dict:
    tokenizer = load_tokenizer("builtin:smollm2-135m")
    made = rows(count, 1.0, 2048, seed=1)
    speeds = {}
    for how, examples in (("chat_template", [as_chat(e) for e in made]), ("plain", made)):
        started = time.perf_counter()
        tokenized(examples, tokenizer, Location(folder / f"speed-{how}"), max_length=2048, chat=how != "plain")
        speeds[how] = round(count / (time.perf_counter() - started), 1)
        print(f"tokenize ({how}, SmolLM2): {speeds[how]:,.0f} rows/s", flush=True)
    return speeds


RSS_CHILD = """
import json, sys
from hft_ray.data.batching import Part, Pool, step_batches


def status(key):  # this address space's figures (ru_maxrss would carry the parent's over exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 2**20


before, anon_before = status("VmRSS:"), status("RssAnon:")
pool = Pool([Part(sys.argv[1])])
stream = step_batches(pool, seed=0, batch_size=8, micro_batch_size=None, rank=0, world=1, pad_id=0, max_length=256)
for _ in range(50):
    next(stream)
# RssFile: the token file's pages in the page cache, which the kernel drops under pressure; RssAnon:
# what the process itself holds.
print(json.dumps({"peak_rss_gb": status("VmHWM:"), "imports_rss_gb": before,
                  "anon_growth_gb": status("RssAnon:") - anon_before, "file_pages_gb": status("RssFile:")}))
"""

def rank_rss(count: int, folder: Path) -> dict:
    """Peak RSS (GB) of a fresh process reading 50 batches of 8 from a token folder of `count`
    rows and of a tenth of them, and what its imports alone hold: a rank's memory should not
    follow the row count."""
    measured = {}
    for rows_in_folder in (count // 10, count):
        where, _ = tokenized(rows(rows_in_folder, 1 / 8, 256, seed=2), char_tokenizer(),
                             Location(folder / f"big-{rows_in_folder}"), max_length=256, chat=False)
        child = subprocess.run([sys.executable, "-c", RSS_CHILD, where], capture_output=True, text=True, check=True)
        measured[rows_in_folder] = json.loads(child.stdout.strip().splitlines()[-1])
        got = measured[rows_in_folder]
        print(f"a rank reading a {rows_in_folder:,}-row token folder: peak RSS {got['peak_rss_gb']:.3f} GB "
              f"({got['imports_rss_gb']:.3f} GB after its imports; its own memory grew "
              f"{got['anon_growth_gb'] * 1024:.1f} MB, file pages {got['file_pages_gb'] * 1024:.0f} MB)", flush=True)
    return {"peak_rss_gb": measured[count]["peak_rss_gb"], "imports_rss_gb": measured[count]["imports_rss_gb"],
            "peak_rss_gb_tenth_rows": measured[count // 10]["peak_rss_gb"],
            "anon_growth_gb": measured[count]["anon_growth_gb"],
            "anon_growth_gb_tenth_rows": measured[count // 10]["anon_growth_gb"]}


def cli_data_seconds(count: int, folder: Path) -> float:
    """Wall seconds of `hft-ray data --json` on a `count`-row chat file for SmolLM2 (a fresh
    token store: everything tokenized)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "rows.jsonl").open("w") as out:
        for example in rows(count, 1.0, 2048, seed=3):
            out.write(json.dumps({"messages": [{"role": "user", "content": example.prompt},
                                               {"role": "assistant", "content": example.completion}]}) + "\n")
    (folder / "p.yaml").write_text(json.dumps({
        "name": "throughput", "model": {"source": "builtin:smollm2-135m"},
        "domains": {"chat": {"source": {"path": "rows.jsonl"}}}, "stages": [{"domain": "chat", "steps": 1}],
        "methods": {"fft": {"kind": "fft"}}, "output": {"dir": str(folder / "runs")}}))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hft_ray", "data", str(folder / "p.yaml"), "--json"], check=True,
                   capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(f"hft-ray data on a {count:,}-row chat file (SmolLM2's template): {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    smoke = args.smoke_test
    with tempfile.TemporaryDirectory(prefix="hft-ray-bench-") as scratch:
        folder = Path(scratch)
        models = {"tiny-llama": train_modes("tiny-llama", *MODELS["tiny-llama"], count=400 if smoke else 4000,
                                            batch_size=8, steps=2 if smoke else 6, folder=folder / "tiny")}
        if not smoke:
            models["smollm2-135m"] = train_modes("smollm2-135m", *MODELS["smollm2-135m"], count=2000, batch_size=2,
                                                 steps=2, folder=folder / "smollm2")
        speeds = tokenize_speed(500 if smoke else 10_000, folder)
        rss = rank_rss(2_000 if smoke else 200_000, folder)
        cli = cli_data_seconds(1_000 if smoke else 100_000, folder / "cli")
    headline = models.get("smollm2-135m", models["tiny-llama"])
    result = {"modes": {mode: {k: headline[mode][k] for k in ("useful_share", "useful_tokens_per_s")}
                        for mode in MODES},
              "headline_model": "smollm2-135m" if "smollm2-135m" in models else "tiny-llama",
              "tokenize_rows_per_s": speeds["chat_template"], "tokenize_rows_per_s_plain": speeds["plain"],
              "rank_peak_rss_gb": round(rss["peak_rss_gb"], 3),
              "rank_imports_rss_gb": round(rss["imports_rss_gb"], 3),
              "rank_peak_rss_gb_tenth_rows": round(rss["peak_rss_gb_tenth_rows"], 3),
              "rank_anon_growth_gb": round(rss["anon_growth_gb"], 4),
              "rank_anon_growth_gb_tenth_rows": round(rss["anon_growth_gb_tenth_rows"], 4),
              "rss_rows": 2_000 if smoke else 200_000,
              "hft_ray_data_s": round(cli, 1), "hft_ray_data_rows": 1_000 if smoke else 100_000, "models": models,
              "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    packed, flat = result["modes"]["packed"], result["modes"]["global"]
    print(f"packed vs global: useful share {packed['useful_share']:.2f} vs {flat['useful_share']:.2f}, "
          f"useful tokens/s x{packed['useful_tokens_per_s'] / flat['useful_tokens_per_s']:.2f}; written {OUT}")


if __name__ == "__main__":
    main()
