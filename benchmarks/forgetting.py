"""Forgetting: FFT vs HFT at every granularity, importance-aware HFT, both with replay, LoRA and
the joint (multi-task) reference, over several seeds of the quickstart suite, through the real
tool (`hft-ray run`).

    python benchmarks/forgetting.py                    # 3 seeds, ~15 min each on 2 cores
    python benchmarks/forgetting.py --seeds 0 --smoke-test

Each seed is one pipeline run (pipelines/quickstart.yaml with the methods below and `seed: N`,
which draws the base model, the data and the plans), logged to benchmarks/out/forgetting/mlflow.db.
A finished seed is kept in benchmarks/out/forgetting/seed<N>.json and skipped on the next call
(`--fresh` runs it again). Writes benchmarks/results/forgetting.json (every seed's matrices, exact
match and token accuracy, and per method the mean and sample standard deviation of OP, BWT,
forgetting and held-out delta, and mean matrices: the README's figures come from it, and it is
committed) and forgetting.png, and logs both to an MLflow run named `forgetting-benchmark`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import yaml

from hft_ray.core.metrics import ForgettingMatrix, summary

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = {
    "fft": {"kind": "fft"},
    "hft_category": {"kind": "hft", "granularity": "category", "ratio": 0.5},
    "hft_layer": {"kind": "hft", "granularity": "layer", "ratio": 0.5},
    "hft_model": {"kind": "hft", "granularity": "model", "ratio": 0.5},
    "hft_element": {"kind": "hft", "granularity": "element", "ratio": 0.5},
    "hft_importance": {"kind": "hft", "granularity": "category", "ratio": 0.5, "strategy": "importance"},
    "fft_replay": {"kind": "fft", "replay": 0.2},
    "hft_replay": {"kind": "hft", "granularity": "category", "ratio": 0.5, "replay": 0.2},
    "lora": {"kind": "lora", "r": 8, "alpha": 16},
    "joint": {"kind": "joint"},
}
METRICS = ("OP", "BWT", "forgetting", "heldout_delta")
# The paper's granularity ablation (OP on its continual-learning benchmark).
PAPER_OP = {"fft": 45.7, "hft_model": 46.9, "hft_layer": 47.9, "hft_category": 51.3}


def pipeline_for(seed: int, smoke: bool, folder: Path) -> dict:
    data = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    data.update(name=f"forgetting-seed{seed}", seed=seed, methods=METHODS,
                tracking={"experiment": "forgetting-benchmark"}, output={"dir": str(folder / "runs")})
    if smoke:
        data["pretrain"]["steps"] = 20
        for stage in data["stages"]:
            stage["steps"] = 4
        data["eval"] = {**data["eval"], "max_examples": 16}
    else:
        data["eval"] = {**data["eval"], "max_examples": 100}  # 10 branches x 3 seeds: half the quickstart's
    return data


def run_seed(seed: int, smoke: bool, folder: Path) -> dict:
    """`hft-ray run` of the seed's pipeline; its --json output, kept as seed<N>.json."""
    path = folder / f"seed{seed}.yaml"
    path.write_text(yaml.safe_dump(pipeline_for(seed, smoke, folder), sort_keys=False))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hft_ray", "run", str(path), "--json",
                             "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"],
                            stdout=subprocess.PIPE, text=True, cwd=folder)  # progress goes to stderr, live
    if result.returncode:
        sys.exit(f"seed {seed}: hft-ray run exited {result.returncode}")
    out = json.loads(result.stdout)
    out["wall_s"] = time.perf_counter() - started
    (folder / f"seed{seed}.json").write_text(json.dumps(out, indent=1))
    return out


def with_token_accuracy(out: dict, folder: Path) -> dict:
    """Add each method's graded matrix (teacher-forced token accuracy), logged beside the
    exact-match one in the seed's MLflow run, and its summary."""
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    with tempfile.TemporaryDirectory() as tmp:
        for method, entry in out["methods"].items():
            path = client.download_artifacts(out["parent_run_id"], f"forgetting/{method}.token_accuracy.json", tmp)
            matrix = ForgettingMatrix.from_dict(json.loads(Path(path).read_text()))
            entry["token_accuracy"] = {"matrix": matrix.to_dict(), "summary": summary(matrix)}
    return out


def aggregate(seeds: dict[int, dict]) -> dict:
    methods = {}
    for method in METHODS:
        runs = [seeds[s]["methods"][method] for s in sorted(seeds)]
        stats = {}
        for metric in METRICS:
            for name, summaries in (("", [r["summary"] for r in runs]),
                                    ("token_accuracy.", [r["token_accuracy"]["summary"] for r in runs])):
                values = [s[metric] for s in summaries]
                stats[name + metric] = {"mean": statistics.fmean(values),
                                        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        matrices = [r["matrix"]["scores"] for r in runs]
        stats["mean_matrix"] = [[statistics.fmean(m[i][j] for m in matrices) for j in range(len(matrices[0][0]))]
                                for i in range(len(matrices[0]))]
        stats["columns"] = runs[0]["matrix"]["columns"]
        stats["rows"] = runs[0]["matrix"]["rows"]
        methods[method] = stats
    return {"seeds": sorted(seeds), "methods": methods, "paper_op": PAPER_OP,
            "wall_s": {s: seeds[s]["wall_s"] for s in sorted(seeds)},
            "per_seed": {s: {m: {"exact_match": e["matrix"], "token_accuracy": e["token_accuracy"]["matrix"]}
                             for m, e in seeds[s]["methods"].items()} for s in sorted(seeds)}}


def table(result: dict, prefix: str = "") -> str:
    n = len(result["seeds"])
    lines = ["| method | OP | BWT | forgetting | held-out delta | paper OP |", "|---|---|---|---|---|---|"]
    for method, stats in result["methods"].items():
        cells = [f"{stats[prefix + m]['mean']:.3f} ± {stats[prefix + m]['std']:.3f}" for m in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {PAPER_OP.get(method, '')} |")
    return f"{prefix or 'exact_match.'} mean ± sample std over {n} seed(s)\n" + "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Row 1: exact-match metrics; row 2: the same on token accuracy (bars: mean ± std, dots:
    seeds); row 3: the pretrained knowledge column (`facts`) after each stage, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    colors = ["tab:gray" if m.startswith("fft") else "tab:blue" for m in methods]
    fig = plt.figure(figsize=(4 * len(METRICS), 11))
    grid = fig.add_gridspec(3, len(METRICS))
    for row, prefix in enumerate(("", "token_accuracy.")):
        for col, metric in enumerate(METRICS):
            ax = fig.add_subplot(grid[row, col])
            stats = [result["methods"][m][prefix + metric] for m in methods]
            ax.bar(range(len(methods)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                   color=colors, capsize=3)
            for i, s in enumerate(stats):
                ax.scatter([i] * len(s["values"]), s["values"], color="black", s=8, zorder=3)
            ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
            ax.set_title(f"{metric} ({prefix.rstrip('.') or 'exact_match'})", fontsize=10)
            ax.axhline(0, color="black", linewidth=0.5)
    ax = fig.add_subplot(grid[2, :])
    for method in methods:
        stats = result["methods"][method]
        column = stats["columns"].index("facts")
        ax.plot(range(len(stats["rows"])), [row[column] for row in stats["mean_matrix"]], marker="o", label=method,
                linestyle="--" if method == "joint" else "-", color="black" if method == "joint" else None)
    ax.set_xticks(range(len(stats["rows"])), stats["rows"])
    ax.set_ylabel("facts, exact match (mean over seeds)")
    ax.set_title("pretrained knowledge kept after each stage")
    ax.legend(fontsize=8, ncol=4)
    fig.suptitle(f"quickstart suite, {len(result['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_to_mlflow(folder: Path, files: list[Path], result: dict) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    mlflow.set_experiment("forgetting-benchmark")
    with mlflow.start_run(run_name="forgetting-benchmark"):
        mlflow.log_metrics({f"{m}.{k}.mean": s[k]["mean"] for m, s in result["methods"].items() for k in METRICS})
        for file in files:
            mlflow.log_artifact(str(file))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke-test", action="store_true", help="a few steps per stage: checks the script")
    parser.add_argument("--fresh", action="store_true", help="run seeds again even when their result is kept")
    args = parser.parse_args()
    folder = OUT / ("forgetting-smoke" if args.smoke_test else "forgetting")
    folder.mkdir(parents=True, exist_ok=True)
    seeds = {}
    for seed in args.seeds:
        kept = folder / f"seed{seed}.json"
        if kept.exists() and not args.fresh:
            print(f"[forgetting] seed {seed}: kept from {kept}", file=sys.stderr)
            seeds[seed] = json.loads(kept.read_text())
        else:
            print(f"[forgetting] seed {seed}: running {len(METHODS)} methods", file=sys.stderr)
            seeds[seed] = run_seed(seed, args.smoke_test, folder)
        seeds[seed] = with_token_accuracy(seeds[seed], folder)
    result = aggregate(seeds)
    target = OUT / "forgetting-smoke" if args.smoke_test else RESULTS / "forgetting"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, target.with_suffix(".png"))
    log_to_mlflow(folder, [target.with_suffix(".json"), target.with_suffix(".png")], result)
    print(table(result))
    print(table(result, "token_accuracy."))


if __name__ == "__main__":
    main()
