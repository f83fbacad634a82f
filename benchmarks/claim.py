"""The paper's claim on a real chat model, over seeds: pipelines/smollm2_claim.yaml (SmolLM2-135M-
Instruct in its own chat template, three skills in a row, FFT against importance-aware HFT, seeds
0-2) at two learning rates, through `hft-ray run` (one run per rate; each run pairs the methods seed
by seed and gives Student-t 95% intervals).

    python benchmarks/claim.py                       # both rates, ~70 min each on 2 CPU cores
    python benchmarks/claim.py --outputs 1e-4=a.json 3e-4=b.json   # assemble finished runs' --json

Writes benchmarks/results/claim.json (settings, and per rate the run's --json output plus the paired
comparison of each never-trained column's last score) and prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from hft_ray.core.seeds import paired

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "smollm2_claim.yaml"
OUT = ROOT / "benchmarks" / "out" / "claim"
RESULT = ROOT / "benchmarks" / "results" / "claim.json"
RATES = ("1e-4", "3e-4")
METRICS = ("OP", "BWT", "forgetting", "heldout_delta")
HELD_OUT = ("world", "general_mc")


def run(rate: str) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hft_ray", "run", str(PIPELINE), "--json", "--set",
                             f"train.lr={rate}", "--set", f"output.dir={OUT / 'runs'}",
                             "--tracking-uri", f"sqlite:///{OUT / 'mlflow.db'}"],
                            stdout=subprocess.PIPE, text=True, cwd=PIPELINE.parent)  # progress on stderr, live
    if result.returncode:
        sys.exit(f"lr {rate}: hft-ray run exited {result.returncode}")
    return {**json.loads(result.stdout), "wall_s": time.perf_counter() - started}


def columns(out: dict) -> dict:
    """Each never-trained column's last score per seed, per method, and HFT against FFT on it."""
    reference = out["compare_to"]
    last = {m: {s: dict(zip(e["matrix"]["columns"], e["matrix"]["scores"][-1], strict=True))
                for s, e in entry["per_seed"].items()} for m, entry in out["methods"].items()}
    seeds = [str(s) for s in out["seeds"]]
    table = {}
    for column in HELD_OUT:
        values = {m: [last[m][s][column] for s in seeds] for m in last}
        table[column] = {"base": out["methods"][reference]["matrix"]["scores"][0][
            out["methods"][reference]["matrix"]["columns"].index(column)], "last": values,
            "comparisons": {m: paired(values[m], values[reference]).to_json() for m in values if m != reference}}
    return table


def markdown(result: dict) -> str:
    lines = ["| lr | metric | FFT | HFT (importance) | HFT − FFT, 95% CI | HFT better | interval |",
             "|---|---|---|---|---|---|---|"]
    for rate, out in result["rates"].items():
        fft, hft = out["methods"]["fft"], out["methods"]["hft"]
        for metric in METRICS:
            c = out["comparisons"]["hft"][metric]
            lines.append(f"| {rate} | {metric} | {fft['summary'][metric]:.3f} ± {fft['summary_std'][metric]:.3f} | "
                         f"{hft['summary'][metric]:.3f} ± {hft['summary_std'][metric]:.3f} | {c['diff']:+.3f} "
                         f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['better']}/{c['n']} | "
                         f"{'excludes 0' if c['ci95'][0] > 0 or c['ci95'][1] < 0 else 'includes 0'} |")
        for column, entry in out["held_out"].items():
            c = entry["comparisons"]["hft"]
            f_values, h_values = entry["last"]["fft"], entry["last"]["hft"]
            mean = lambda v: sum(v) / len(v)  # noqa: E731
            lines.append(f"| {rate} | {column} after stage 3 (base {entry['base']:.3f}) | {mean(f_values):.3f} | "
                         f"{mean(h_values):.3f} | {c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
                         f"{c['better']}/{c['n']} | "
                         f"{'excludes 0' if c['ci95'][0] > 0 or c['ci95'][1] < 0 else 'includes 0'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", nargs="+", metavar="RATE=FILE", help="finished runs' --json output, by rate")
    args = parser.parse_args()
    outputs = dict(item.split("=", 1) for item in args.outputs) if args.outputs else {}
    rates = {rate: json.loads(Path(outputs[rate]).read_text()) if rate in outputs else run(rate)
             for rate in (outputs or RATES)}
    for out in rates.values():
        out["held_out"] = columns(out)
    result = {"pipeline": yaml.safe_load(PIPELINE.read_text()), "rates": rates,
              "interval": "Student t over the paired per-seed differences (hft_ray/core/seeds.py)",
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads"}
    RESULT.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
