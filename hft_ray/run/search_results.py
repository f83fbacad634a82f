"""What a finished search leaves: a row per trial (from its MLflow child run and Tune's last
result), results.csv, the objective-vs-ratio figure, the best config and a ready pipeline file
with the best trial's method beside FFT."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hft_ray.config.space import SEARCHED, LoadedSpace
from hft_ray.config.trial_pipeline import best_pipeline_text
from hft_ray.run.manifest import Manifest
from hft_ray.run.plots import objective_vs_ratio
from hft_ray.run.runner import RunFailure
from hft_ray.run.tracking import SearchTracker

SUMMARY = ("objective", "OP", "BWT", "FWT", "forgetting", "heldout_delta")
SPREAD = tuple(f"{k}.std" for k in SUMMARY)  # over a trial's seeds (`space.seeds`)
RESULT_COLUMNS = ("trial_id", *SEARCHED, "status", "stages_done", *SUMMARY, "run_id")
SEEDED_COLUMNS = ("trial_id", *SEARCHED, "status", "stages_done", "seeds", *SUMMARY, *SPREAD, "run_id")
STATUS = {"FINISHED": "finished", "KILLED": "stopped_early"}
BEST_PIPELINE = "best_pipeline.yaml"


@dataclass
class TuneResult:
    parent_run_id: str
    output_dir: str
    rows: list[dict]             # one per trial (results.csv)
    best: dict | None            # the best finished trial's row, with its matrix
    best_pipeline: str | None    # path of the ready pipeline file

    def to_json(self) -> dict:
        return {"parent_run_id": self.parent_run_id, "output_dir": self.output_dir, "trials": self.rows,
                "best": self.best, "best_pipeline": self.best_pipeline}


def trial_rows(tracker: SearchTracker, parent_id: str, grid) -> tuple[list[dict], dict[str, dict]]:
    """A row per trial that started, and each trial's last reported result, by trial id."""
    last = {r.metrics["trial_id"]: r for r in grid if r.metrics and "trial_id" in r.metrics}
    rows, results = [], {}
    for run in tracker.trial_runs(parent_id):
        trial_id = run.data.tags["hft.trial_id"]
        result = last.get(trial_id)
        metrics = result.metrics if result else run.data.metrics
        config = result.config if result else run.data.params
        results[trial_id] = metrics
        rows.append({"trial_id": trial_id, **{k: config.get(k, "") for k in SEARCHED},
                     "status": STATUS.get(run.info.status, "error"), "stages_done": metrics.get("stage", 0),
                     **{k: metrics.get(k, "") for k in ("seeds", *SUMMARY, *SPREAD)}, "run_id": run.info.run_id})
    return rows, results


def search_results(loaded: LoadedSpace, tracker: SearchTracker, manifest: Manifest, grid) -> TuneResult:
    space, spec = loaded.space, loaded.spec
    parent_id, folder = manifest.parent_run_id, manifest.folder
    rows, results = trial_rows(tracker, parent_id, grid)
    if not rows and any(r.error for r in grid):
        raise RunFailure(f"every trial failed; logs under {folder / 'tune'}")
    mode = space.objective.direction
    finished = [r for r in rows if r["status"] == "finished"]
    best = (max if mode == "max" else min)(finished, key=lambda r: r["objective"]) if finished else None
    with tempfile.TemporaryDirectory() as scratch:
        table = Path(scratch) / "results.csv"
        table.write_text(_csv(rows))
        tracker.log_file(parent_id, table)
        plot = Path(scratch) / "objective_vs_ratio.png"
        objective_vs_ratio(rows, plot, f"{spec.name}: {space.objective.metric} ({mode}) vs ratio")
        tracker.log_file(parent_id, plot)
    (folder / "results.csv").write_text(_csv(rows))
    if best is None:
        return TuneResult(parent_id, str(folder), rows, None, None)
    config = {k: best[k] for k in SEARCHED if best[k] != ""}
    best = {**best, "matrix": json.loads(results[best["trial_id"]]["matrix"])}
    spread = {"objective_std": best["objective.std"], "seeds": spec.seeds} if best.get("objective.std") != "" else {}
    tracker.log_json(parent_id, {"config": config, "objective": best["objective"], **spread,
                                 "trial_id": best["trial_id"], "run_id": best["run_id"]}, "best_config.json")
    tracker.log_params(parent_id, {f"best.{k}": v for k, v in config.items()})
    tracker.log_metrics(parent_id, {"best.objective": best["objective"]})
    text = best_pipeline_text(loaded.pipeline_data, loaded.pipeline_path, config)
    (folder / BEST_PIPELINE).write_text(text)
    tracker.log_text(parent_id, text, BEST_PIPELINE)
    return TuneResult(parent_id, str(folder), rows, best, str(folder / BEST_PIPELINE))


def _csv(rows: list[dict]) -> str:
    """A row per trial; with seeds, the metrics are means and each has its `.std` column."""
    out = io.StringIO()
    seeded = any(r.get("objective.std", "") != "" for r in rows)
    writer = csv.DictWriter(out, fieldnames=SEEDED_COLUMNS if seeded else RESULT_COLUMNS, lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
