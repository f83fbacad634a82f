"""Calibrate the built-in suite: pretrain a tiny model on `facts` and skills, then fine-tune it on
the skill domains in sequence, once with full fine-tuning (FFT) and once with Half Fine-Tuning
(HFT, category rule, ratio 0.5, a new plan per stage), at equal steps; evaluate every domain
after every stage. Prints and saves the forgetting matrices (exact match and token accuracy)
and the wall times. Plain torch, one thread per process, no Ray, no MLflow.

    python benchmarks/calibrate_suite.py                 # the shipped settings, FFT and HFT side by side
    python benchmarks/calibrate_suite.py --smoke-test    # the same code, a few steps
    python benchmarks/calibrate_suite.py --stage-steps 300 --stage-lr 1e-3 --jobs 1

The targets (benchmarks/CALIBRATION.md, issue 15): each stage learnt to >= 0.9 by both methods;
FFT's BWT between -0.6 and -0.1 on exact match and on token accuracy (part of each earlier stage
forgotten, not all); calibrated with `--methods fft` alone, then HFT run at the same settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hft_ray.core.selection import select  # noqa: E402
from hft_ray.data.encoding import encode  # noqa: E402
from hft_ray.data.loading import load_domain
from hft_ray.data.mixing import mix_balanced
from hft_ray.train.evaluation import evaluate  # noqa: E402
from hft_ray.train.loop import train  # noqa: E402
from hft_ray.train.models import char_tokenizer, load_model  # noqa: E402

OUT = Path(__file__).parent / "out" / "calibrate_suite.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--facts", type=int, default=150, help="number of invented facts in pretraining")
    parser.add_argument("--pretrain-domains", default="facts,copy,next,prev,primer",
                        help="built-in kinds mixed in pretraining")
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--stages", default="caesar,atbash,upper", help="built-in skill kinds, in order")
    parser.add_argument("--stage-steps", type=int, default=300)
    parser.add_argument("--stage-lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--methods", default="fft,hft")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="methods trained side by side, one thread each")
    parser.add_argument("--base", type=Path, help="reuse (or write) the pretrained base state dict here")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--smoke-test", action="store_true", help="a few steps of everything")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.pretrain_steps, args.stage_steps, args.eval_size, args.facts = 20, 10, 20, 20
    return args


def load_suite(args) -> dict:
    domains = {"facts": load_domain("facts", "builtin:facts", seed=args.seed, train_size=args.facts)}
    for kind in dict.fromkeys(args.pretrain_domains.split(",") + args.stages.split(",")):
        if kind == "facts":
            continue
        domains[kind] = load_domain(kind, f"builtin:{kind}", seed=args.seed, eval_size=args.eval_size)
    return domains


def eval_row(model, tokenizer, domains, args) -> dict[str, dict[str, float]]:
    return {name: evaluate(model, tokenizer, d.eval, max_new_tokens=args.max_new_tokens) for name, d in domains.items()}


def run_branch(method: str, base_state: dict, args) -> dict:
    """The stages of one method from the pretrained base; a row of scores after each."""
    torch.set_num_threads(1)
    tokenizer, domains = char_tokenizer(), load_suite(args)
    model = load_model(args.model, seed=args.seed)
    model.load_state_dict(base_state)
    rows, times = [], []
    for stage, kind in enumerate(args.stages.split(",")):
        plan = select(model, "category", 0.5, seed=args.seed, stage=stage) if method == "hft" else None
        encoded = encode(domains[kind].train, tokenizer, args.max_length, domain=kind)
        start = time.perf_counter()
        train(model, encoded, steps=args.stage_steps, lr=args.stage_lr, batch_size=args.batch_size,
              plan=plan, seed=args.seed + stage + 1)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        rows.append(eval_row(model, tokenizer, domains, args))
        times.append({"train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - start, 1)})
        print(f"[{method}] stage {stage + 1} {kind}: {train_s:.0f} s; "
              + " ".join(f"{n}={s['exact_match']:.2f}/{s['token_accuracy']:.2f}" for n, s in rows[-1].items()),
              flush=True)
    return {"rows": rows, "times": times}


def _branch_worker(method, base_path, args):
    return method, run_branch(method, torch.load(base_path, weights_only=True), args)


def pretrain(args, domains, tokenizer) -> tuple[dict, float]:
    if args.base is not None and args.base.is_file():
        return torch.load(args.base, weights_only=True), 0.0
    model = load_model(args.model, seed=args.seed)
    # One mix of the pretraining domains, each repeated up to the largest one's size, so that
    # 150 facts are not drowned by 2000 copy examples.
    mixed = mix_balanced([domains[k].train for k in args.pretrain_domains.split(",")])
    encoded = encode(mixed, tokenizer, args.max_length, domain="pretrain")
    start = time.perf_counter()
    losses = train(model, encoded, steps=args.pretrain_steps, lr=args.pretrain_lr, batch_size=args.batch_size,
                   seed=args.seed)
    seconds = time.perf_counter() - start
    print(f"pretrain: {args.pretrain_steps} steps in {seconds:.0f} s, final loss {losses[-1]:.4f}", flush=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.base is not None:
        args.base.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, args.base)
    return state, seconds


def print_matrix(title: str, labels: list[str], rows: list[dict], metric: str) -> str:
    columns = list(rows[0])
    lines = [f"{title} ({metric})", "| after | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in zip(labels, rows, strict=True):
        lines.append(f"| {label} | " + " | ".join(f"{row[c][metric]:.2f}" for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None) -> dict:
    torch.set_num_threads(1)
    args = parse_args(argv)
    started = time.perf_counter()
    tokenizer, domains = char_tokenizer(), load_suite(args)
    base_state, pretrain_s = pretrain(args, domains, tokenizer)
    model = load_model(args.model, seed=args.seed)
    model.load_state_dict(base_state)
    start = time.perf_counter()
    base_row = eval_row(model, tokenizer, domains, args)
    base_eval_s = time.perf_counter() - start
    print("base: " + " ".join(f"{n}={s['exact_match']:.2f}/{s['token_accuracy']:.2f}" for n, s in base_row.items()))

    methods = args.methods.split(",")
    branches_start = time.perf_counter()
    if args.jobs > 1 and len(methods) > 1:
        # Spawned workers, one thread each: a fork after torch started threads can hang.
        base_path = args.out.with_suffix(".base.pt")
        base_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base_state, base_path)
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(methods))) as pool:
            results = dict(pool.starmap(_branch_worker, [(m, str(base_path), args) for m in methods]))
        base_path.unlink()
    else:
        results = {m: run_branch(m, copy.deepcopy(base_state), args) for m in methods}
    branches_s = time.perf_counter() - branches_start

    labels = ["base (after pretrain)"] + [f"{i + 1}: {k}" for i, k in enumerate(args.stages.split(","))]
    for method in methods:
        for metric in ("exact_match", "token_accuracy"):
            print_matrix(method.upper(), labels, [base_row] + results[method]["rows"], metric)
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "labels": labels,
        "base": base_row,
        "methods": results,
        "times": {"pretrain_s": round(pretrain_s, 1), "base_eval_s": round(base_eval_s, 1),
                  "branches_s": round(branches_s, 1), "total_s": round(time.perf_counter() - started, 1)},
    }
    print(json.dumps(summary["times"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
