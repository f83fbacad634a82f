"""Forgetting: FFT vs HFT at every granularity, importance-aware HFT, both with replay, LoRA and
the joint (multi-task) reference, over several seeds of the quickstart suite, through the real
tool: one `hft-ray run` with `seeds:` (each method a branch per seed, paired comparisons with FFT).

    python benchmarks/forgetting.py                    # 3 seeds, ~45 min on 2 cores
    python benchmarks/forgetting.py --seeds 0 1 --smoke-test

The pipeline is pipelines/quickstart.yaml with the methods below and `seeds: [...]`, logged to
benchmarks/out/forgetting/mlflow.db; a run whose driver died goes on with `--resume`. Writes
benchmarks/results/forgetting.json (the run's --json output: every seed's matrix, the means,
deviations and each method's paired comparison with FFT; and per method the mean, sample standard
deviation and values of OP, BWT, forgetting and held-out delta on exact match and on token
accuracy, read from each seed's child run: the README's figures come from it, and it is committed)
and forgetting.png, and logs both to an MLflow run named `forgetting-benchmark`.
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


def pipeline(seeds: list[int], smoke: bool, folder: Path) -> dict:
    data = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    data.update(name="forgetting", seeds=seeds, methods=METHODS, compare_to="fft",
                tracking={"experiment": "forgetting-benchmark"}, output={"dir": str(folder / "runs")})
    if smoke:
        data["pretrain"]["steps"] = 20
        for stage in data["stages"]:
            stage["steps"] = 4
        data["eval"] = {**data["eval"], "max_examples": 16}
    else:
        data["eval"] = {**data["eval"], "max_examples": 100}  # 10 branches x 3 seeds: half the quickstart's
    return data


def run(seeds: list[int], smoke: bool, folder: Path, resume: bool) -> dict:
    """`hft-ray run` of the pipeline over the seeds; its --json output."""
    path = folder / "forgetting.yaml"
    path.write_text(yaml.safe_dump(pipeline(seeds, smoke, folder), sort_keys=False))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hft_ray", "run", str(path), "--json",
                             "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", *(["--resume"] if resume else [])],
                            stdout=subprocess.PIPE, text=True, cwd=folder)  # progress goes to stderr, live
    if result.returncode:
        sys.exit(f"hft-ray run exited {result.returncode}" + ("" if resume else "; go on with --resume"))
    out = json.loads(result.stdout)
    out["wall_s"] = time.perf_counter() - started
    return out


def token_accuracy(out: dict, folder: Path) -> dict[str, dict[int, dict]]:
    """Each method's graded matrix (teacher-forced token accuracy) per seed, logged beside the
    exact-match one in each seed's child run: {method: {seed: matrix dict}}."""
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = client.get_run(out["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                              "and tags.`hft.kind` = 'seed'")
    matrices: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for child in runs:
            method, seed = child.data.tags["hft.method"], int(child.data.tags["hft.seed"])
            path = client.download_artifacts(child.info.run_id, f"forgetting/{method}.token_accuracy.json", tmp)
            matrices.setdefault(method, {})[seed] = json.loads(Path(path).read_text())
    return matrices


def aggregate(out: dict, graded: dict[str, dict[int, dict]]) -> dict:
    """The run's output, and per method and metric the mean, std and values on both scores."""
    seeds = out["seeds"]
    methods = {}
    for method, entry in out["methods"].items():
        stats = {}
        for metric in METRICS:
            for name, summaries in (("", [entry["per_seed"][str(s)]["summary"] for s in seeds]),
                                    ("token_accuracy.", [summary(ForgettingMatrix.from_dict(graded[method][s]))
                                                         for s in seeds])):
                values = [v[metric] for v in summaries]
                stats[name + metric] = {"mean": statistics.fmean(values),
                                        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        stats.update(mean_matrix=entry["matrix"]["scores"], columns=entry["matrix"]["columns"],
                     rows=entry["matrix"]["rows"])
        methods[method] = stats
    return {"seeds": seeds, "methods": methods, "paper_op": PAPER_OP, "wall_s": out["wall_s"],
            "comparisons": out["comparisons"], "run": out,
            "per_seed": {s: {m: {"exact_match": out["methods"][m]["per_seed"][str(s)]["matrix"],
                                 "token_accuracy": graded[m][s]} for m in out["methods"]} for s in seeds}}


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
    parser.add_argument("--resume", action="store_true", help="go on with the run whose driver died")
    args = parser.parse_args()
    folder = OUT / ("forgetting-smoke" if args.smoke_test else "forgetting")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[forgetting] {len(METHODS)} methods x seeds {args.seeds}", file=sys.stderr)
    out = run(args.seeds, args.smoke_test, folder, args.resume)
    result = aggregate(out, token_accuracy(out, folder))
    target = OUT / "forgetting-smoke" if args.smoke_test else RESULTS / "forgetting"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, target.with_suffix(".png"))
    log_to_mlflow(folder, [target.with_suffix(".json"), target.with_suffix(".png")], result)
    print(table(result))
    print(table(result, "token_accuracy."))


if __name__ == "__main__":
    main()
