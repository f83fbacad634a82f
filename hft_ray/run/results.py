"""A finished run's forgetting matrices and summaries, from its rows, into MLflow (through the
tracker) and `result.json` in the run's folder."""

from __future__ import annotations

import json
import tempfile
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hft_ray.config.spec import PipelineSpec
from hft_ray.core.metrics import ForgettingMatrix, summary
from hft_ray.core.scores import NAMES, describe
from hft_ray.run.tracking import Tracker
from hft_ray.storage import Location
from hft_ray.train.methods import method_class

Row = dict[str, dict[str, float]]


@dataclass
class PipelineResult:
    parent_run_id: str
    output_dir: str
    matrices: dict[str, ForgettingMatrix]
    summaries: dict[str, dict[str, float]]

    def to_json(self) -> dict:
        return {"parent_run_id": self.parent_run_id, "output_dir": self.output_dir,
                "methods": {m: {"matrix": self.matrices[m].to_dict(), "summary": self.summaries[m]}
                            for m in self.matrices}}


def build_matrix(spec: PipelineSpec, rows: list[Row], metric: str | Mapping[str, str]) -> ForgettingMatrix:
    """R from row 0 (base) and one row per stage done (a trial stopped early has fewer); each
    column reads its own score (`metric`: by domain, or one name for every column)."""
    columns = list(spec.domains)
    reads = {c: metric for c in columns} if isinstance(metric, str) else metric
    stage_domains = [s.domain for s in spec.stages][:len(rows) - 1]
    return ForgettingMatrix.build(columns, stage_domains, [[row[c][reads[c]] for c in columns] for row in rows])


def record_results(spec: PipelineSpec, tracker: Tracker, parent_id: str, output_dir: Location,
                   rows: dict, metrics: Mapping[str, str]) -> PipelineResult:
    """`rows`: {"base": row 0, method: {stage: row}}; `metrics`: the score each column reads.
    Logs `forgetting/<method>.{json,csv,png}` (each column its own score), beside it the matrix of
    every score that is not already every column's as `forgetting/<method>.<name>.{json,csv}`
    (`.token_accuracy`, ...), the comparison figure and the summaries."""
    from hft_ray.run.plots import comparison, heatmap

    matrices, summaries = {}, {}
    title = "\n".join(textwrap.wrap(describe(metrics), 70))  # per column when they differ
    with tempfile.TemporaryDirectory() as folder:
        for method in spec.methods:
            branch_rows = [rows["base"]] + [rows[method][i] for i in range(1, len(spec.stages) + 1)]
            matrices[method] = build_matrix(spec, branch_rows, metrics)
            uniform = [name for name in NAMES if set(metrics.values()) != {name}]
            for suffix, matrix in [("", matrices[method])] + [
                    (f".{name}", build_matrix(spec, branch_rows, name)) for name in uniform]:
                tracker.log_json(parent_id, matrix.to_dict(), f"forgetting/{method}{suffix}.json")
                tracker.log_text(parent_id, matrix.to_csv(), f"forgetting/{method}{suffix}.csv")
            png = Path(folder) / f"{method}.png"
            heatmap(matrices[method], f"{spec.name}: {method} ({title})", png)
            tracker.log_file(parent_id, png, "forgetting")
            summaries[method] = summary(matrices[method])
            tracker.log_metrics(parent_id, {f"{method}.{k}": v for k, v in summaries[method].items()})
        png = Path(folder) / "comparison.png"
        references = [m for m, method in spec.methods.items() if method_class(method.kind).reference]
        comparison(matrices, png, title=f"{spec.name}: methods compared ({title})", references=references)
        tracker.log_file(parent_id, png, "forgetting")
    (output_dir / "result.json").write_text(json.dumps(
        {m: {"matrix": matrices[m].to_dict(), "summary": summaries[m]} for m in matrices}, indent=1))
    return PipelineResult(parent_id, str(output_dir), matrices, summaries)
