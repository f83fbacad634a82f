"""A finished run's forgetting matrices and summaries, from its rows, into MLflow (through the
tracker) and `result.json` in the run's folder."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hft_ray.config.spec import PipelineSpec
from hft_ray.core.metrics import ForgettingMatrix, summary
from hft_ray.run.tracking import Tracker
from hft_ray.storage import Location

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


def build_matrix(spec: PipelineSpec, rows: list[Row], metric: str) -> ForgettingMatrix:
    """R from row 0 (base) and one row per stage done (a trial stopped early has fewer)."""
    columns = list(spec.domains)
    stage_domains = [s.domain for s in spec.stages][:len(rows) - 1]
    return ForgettingMatrix.build(columns, stage_domains, [[row[c][metric] for c in columns] for row in rows])


def record_results(spec: PipelineSpec, tracker: Tracker, parent_id: str, output_dir: Location,
                   rows: dict) -> PipelineResult:
    """`rows`: {"base": row 0, method: {stage: row}}. Logs `forgetting/<method>.{json,csv,png}`
    (and `.token_accuracy` beside the chosen metric), the comparison figure and the summaries."""
    from hft_ray.run.plots import comparison, heatmap

    matrices, summaries = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for method in spec.methods:
            branch_rows = [rows["base"]] + [rows[method][i] for i in range(1, len(spec.stages) + 1)]
            for metric in ("exact_match", "token_accuracy"):
                matrix = build_matrix(spec, branch_rows, metric)
                suffix = "" if metric == spec.eval.metric else f".{metric}"
                tracker.log_json(parent_id, matrix.to_dict(), f"forgetting/{method}{suffix}.json")
                tracker.log_text(parent_id, matrix.to_csv(), f"forgetting/{method}{suffix}.csv")
                if not suffix:
                    matrices[method] = matrix
            png = Path(folder) / f"{method}.png"
            heatmap(matrices[method], f"{spec.name}: {method} ({spec.eval.metric})", png)
            tracker.log_file(parent_id, png, "forgetting")
            summaries[method] = summary(matrices[method])
            tracker.log_metrics(parent_id, {f"{method}.{k}": v for k, v in summaries[method].items()})
        png = Path(folder) / "comparison.png"
        joint = [m for m, method in spec.methods.items() if method.kind == "joint"]
        comparison(matrices, png, title=f"{spec.name}: methods compared ({spec.eval.metric})", references=joint)
        tracker.log_file(parent_id, png, "forgetting")
    (output_dir / "result.json").write_text(json.dumps(
        {m: {"matrix": matrices[m].to_dict(), "summary": summaries[m]} for m in matrices}, indent=1))
    return PipelineResult(parent_id, str(output_dir), matrices, summaries)
