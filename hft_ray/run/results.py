"""A finished run's forgetting matrices and summaries, from its rows, into MLflow (through the
tracker) and `result.json` (in the run's folder, and as the parent run's artifact that
`hft-ray report` reads).

With several seeds (`seeds:`), each method's matrices and summaries are means over its seeds,
beside their standard deviations, every seed's own, and each method's paired comparison with
the reference method (hft_ray/core/seeds.py). The JSON shape is a contract:

    {"parent_run_id", "output_dir", "methods": {m: {"matrix", "summary"}}}          one seed
    ... "methods": {m: {"matrix", "matrix_std", "summary", "summary_std",
                        "per_seed": {seed: {"summary", "matrix"}}}},
        "seeds": [...], "compare_to": reference,
        "comparisons": {m: {metric: {"diff", "ci95": [lo, hi], "n", "better"}}}      several seeds
"""

from __future__ import annotations

import json
import tempfile
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hft_ray.config.spec import PipelineSpec
from hft_ray.core.metrics import ForgettingMatrix, summary
from hft_ray.core.scores import NAMES, describe
from hft_ray.core.seeds import Comparison, compare, matrices_over_seeds, summaries_over_seeds
from hft_ray.run.layout import Layout
from hft_ray.run.tracking import Tracker
from hft_ray.train.methods import method_class

Row = dict[str, dict[str, float]]
RESULT_FILE = "result.json"


@dataclass
class PipelineResult:
    parent_run_id: str
    output_dir: str
    matrices: dict[str, ForgettingMatrix]          # by method; the mean matrix over seeds
    summaries: dict[str, dict[str, float]]         # by method; the means over seeds
    seeds: list[int] = field(default_factory=list)  # several seeds only, and then all that follows
    reference: str = ""
    matrix_std: dict[str, ForgettingMatrix] = field(default_factory=dict)
    summary_std: dict[str, dict[str, float]] = field(default_factory=dict)
    per_seed: dict[str, dict[int, tuple[ForgettingMatrix, dict[str, float]]]] = field(default_factory=dict)
    comparisons: dict[str, dict[str, Comparison]] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"parent_run_id": self.parent_run_id, "output_dir": self.output_dir,
               "methods": {m: {"matrix": self.matrices[m].to_dict(), "summary": self.summaries[m]}
                           for m in self.matrices}}
        if not self.seeds:
            return out
        for method, entry in out["methods"].items():
            entry.update(matrix_std=self.matrix_std[method].to_dict(), summary_std=self.summary_std[method],
                         per_seed={str(s): {"summary": v, "matrix": m.to_dict()}
                                   for s, (m, v) in self.per_seed[method].items()})
        out.update(seeds=self.seeds, compare_to=self.reference,
                   comparisons={m: {k: c.to_json() for k, c in by.items()} for m, by in self.comparisons.items()})
        return out


def build_matrix(spec: PipelineSpec, rows: list[Row], metric: str | Mapping[str, str]) -> ForgettingMatrix:
    """R from row 0 (base) and one row per stage done (a trial stopped early has fewer); each
    column reads its own score (`metric`: by domain, or one name for every column)."""
    columns = list(spec.domains)
    reads = {c: metric for c in columns} if isinstance(metric, str) else metric
    stage_domains = [s.domain for s in spec.stages][:len(rows) - 1]
    return ForgettingMatrix.build(columns, stage_domains, [[row[c][reads[c]] for c in columns] for row in rows])


def aggregate(spec: PipelineSpec, layout: Layout, rows: dict, metrics: Mapping[str, str | Mapping[str, str]],
              parent_run_id: str = "", output_dir: str = "") -> PipelineResult:
    """`rows`: {"bases": {key: row 0}, branch: {stage: row}}; `metrics`: the score each column
    reads. One seed: each method's matrix and summary; several: as the module says."""
    per_seed: dict[str, dict[int, tuple[ForgettingMatrix, dict]]] = {m: {} for m in spec.methods}
    for name, node in layout.branches.items():
        matrix = build_matrix(spec, _branch_rows(spec, layout, rows, name), metrics)
        per_seed[node.method][node.seed] = (matrix, summary(matrix))
    if not layout.several:
        return PipelineResult(parent_run_id, output_dir, {m: next(iter(s.values()))[0] for m, s in per_seed.items()},
                              {m: next(iter(s.values()))[1] for m, s in per_seed.items()})
    result = PipelineResult(parent_run_id, output_dir, {}, {}, layout.seeds, spec.reference, per_seed=per_seed)
    for method, by_seed in per_seed.items():
        ordered = [by_seed[s] for s in layout.seeds]
        result.matrices[method], result.matrix_std[method] = matrices_over_seeds([m for m, _ in ordered])
        result.summaries[method], result.summary_std[method] = summaries_over_seeds([v for _, v in ordered])
    result.comparisons = compare({s: {m: per_seed[m][s][1] for m in spec.methods} for s in layout.seeds},
                                 spec.reference)
    return result


def record_results(spec: PipelineSpec, layout: Layout, tracker: Tracker, parent_id: str, rows: dict,
                   metrics: Mapping[str, str]) -> PipelineResult:
    """Logs `forgetting/<method>.{json,csv,png}` (each column its own score; over seeds the mean,
    with `<method>.std.{json,csv}`), beside it the matrix of every score that is not already every
    column's as `forgetting/<method>.<name>.{json,csv}` (`.token_accuracy`, ...; over seeds in each
    seed's child run), the comparison figure, the summaries (`<method>.<metric>`, over seeds also
    `.std` and `compare.<method>.<metric>.diff|lo|hi`), per seed a child run with its own, and
    result.json."""
    from hft_ray.run.plots import comparison, heatmap

    result = aggregate(spec, layout, rows, metrics, parent_id, str(layout.folder))
    title = "\n".join(textwrap.wrap(describe(metrics), 70))  # per column when they differ
    several = f" (mean of {len(result.seeds)} seeds)" if result.seeds else ""
    with tempfile.TemporaryDirectory() as folder:
        for method, matrix in result.matrices.items():
            logged = [("", matrix)]
            if result.seeds:
                logged.append((".std", result.matrix_std[method]))
                tracker.log_metrics(parent_id, {f"{method}.{k}.std": v for k, v in result.summary_std[method].items()})
            else:
                branch_rows = _branch_rows(spec, layout, rows, method)
                logged += [(f".{name}", build_matrix(spec, branch_rows, name)) for name in _other_scores(metrics)]
            for suffix, logged_matrix in logged:
                tracker.log_json(parent_id, logged_matrix.to_dict(), f"forgetting/{method}{suffix}.json")
                tracker.log_text(parent_id, logged_matrix.to_csv(), f"forgetting/{method}{suffix}.csv")
            png = Path(folder) / f"{method}.png"
            heatmap(matrix, f"{spec.name}: {method}{several} ({title})", png)
            tracker.log_file(parent_id, png, "forgetting")
            tracker.log_metrics(parent_id, {f"{method}.{k}": v for k, v in result.summaries[method].items()})
        for method, by_metric in result.comparisons.items():
            for metric, c in by_metric.items():
                bounds = dict(zip(("lo", "hi"), c.ci95, strict=True)) if c.ci95 else {}
                tracker.log_metrics(parent_id, {f"compare.{method}.{metric}.{part}": value
                                                for part, value in {"diff": c.diff, **bounds}.items()})
        for method, by_seed in result.per_seed.items() if result.seeds else ():
            for seed, (matrix, values) in by_seed.items():
                run_id = tracker.start_seed(parent_id, method, seed)
                tracker.log_metrics(run_id, values)
                branch_rows = _branch_rows(spec, layout, rows, layout.branch_name(method, seed))
                for suffix, logged_matrix in [("", matrix)] + [(f".{name}", build_matrix(spec, branch_rows, name))
                                                               for name in _other_scores(metrics)]:
                    tracker.log_json(run_id, logged_matrix.to_dict(), f"forgetting/{method}{suffix}.json")
                tracker.finish(run_id)
        png = Path(folder) / "comparison.png"
        references = [m for m, method in spec.methods.items() if method_class(method.kind).reference]
        comparison(result.matrices, png, title=f"{spec.name}: methods compared{several} ({title})",
                   references=references, summaries=result.summaries,
                   spread={m: (result.summary_std[m], result.matrix_std[m]) for m in result.matrix_std})
        tracker.log_file(parent_id, png, "forgetting")
        tracker.log_json(parent_id, result.to_json(), RESULT_FILE)
    (layout.folder / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=1))
    return result


def _branch_rows(spec: PipelineSpec, layout: Layout, rows: dict, branch: str) -> list[Row]:
    """Row 0 (the branch's base) and the branch's stage rows, in order."""
    return [rows["bases"][layout.branches[branch].base]] + [rows[branch][i] for i in range(1, len(spec.stages) + 1)]


def _other_scores(metrics: Mapping[str, str]) -> list[str]:
    """The scores whose matrix is logged beside the one the columns read."""
    return [name for name in NAMES if set(metrics.values()) != {name}]


def result_from_json(data: dict) -> PipelineResult:
    """The result as `to_json` wrote it (hft-ray report reads a past run's so)."""
    methods = data["methods"]
    result = PipelineResult(data.get("parent_run_id", ""), data.get("output_dir", ""),
                            {m: ForgettingMatrix.from_dict(e["matrix"]) for m, e in methods.items()},
                            {m: e["summary"] for m, e in methods.items()})
    if data.get("seeds"):
        result.seeds, result.reference = data["seeds"], data["compare_to"]
        result.matrix_std = {m: ForgettingMatrix.from_dict(e["matrix_std"]) for m, e in methods.items()}
        result.summary_std = {m: e["summary_std"] for m, e in methods.items()}
        result.per_seed = {m: {int(s): (ForgettingMatrix.from_dict(v["matrix"]), v["summary"])
                               for s, v in e["per_seed"].items()} for m, e in methods.items()}
        result.comparisons = {m: {k: Comparison(c["diff"], tuple(c["ci95"]) if c["ci95"] else None, c["n"],
                                                c["better"]) for k, c in by.items()}
                              for m, by in data["comparisons"].items()}
    return result
