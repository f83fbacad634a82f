"""MLflow: a parent run per pipeline invocation, a child run per (method, stage).

Only the driver writes (sqlite locks under many writers), through `MlflowClient` with
explicit run ids, so runs never depend on a thread's "active run". Layout: docs/design.md.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(flag: str | None) -> str:
    """The flag, else MLFLOW_TRACKING_URI, else ./mlflow.db (sqlite)."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(data, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}; lists index their items."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if items is None:
        return {prefix: str(data)}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=self._artifact_root(experiment))

    def _artifact_root(self, experiment: str) -> str | None:
        # Keep a local store's artifacts beside its database, not in whatever cwd runs it.
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///")).resolve()
            return (db.parent / "mlartifacts" / experiment).as_uri()
        return None

    # -- runs ------------------------------------------------------------------------------------

    def start_pipeline(self, name: str, params: dict, pipeline_text: str, effective: dict, output_dir: str = "") -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"hft.kind": "pipeline", "hft.pipeline": name, "hft.output_dir": output_dir})
        run_id = run.info.run_id
        self.log_params(run_id, params)
        self.client.log_text(run_id, pipeline_text, "pipeline.yaml")
        self.client.log_dict(run_id, effective, "pipeline.effective.json")
        return run_id

    def start_stage(self, parent_id: str, method: str, stage: int, domain: str, seed: int | None = None) -> str:
        """A stage's child run; `seed` with several seeds (the run's name then says method@seed)."""
        tags = {"mlflow.parentRunId": parent_id, "hft.kind": "stage", "hft.method": method,
                "hft.stage": str(stage), "hft.domain": domain, **({} if seed is None else {"hft.seed": str(seed)})}
        branch = method if seed is None else f"{method}@{seed}"
        return self.client.create_run(self.experiment_id, run_name=f"{branch}/{stage}:{domain}", tags=tags).info.run_id

    def start_seed(self, parent_id: str, method: str, seed: int) -> str:
        """The child run of one method's one seed, with several seeds: its summary and matrix."""
        tags = {"mlflow.parentRunId": parent_id, "hft.kind": "seed", "hft.method": method, "hft.seed": str(seed)}
        return self.client.create_run(self.experiment_id, run_name=f"{method}@{seed}", tags=tags).info.run_id

    def log_selection(self, run_id: str, selection: dict, replay: float = 0.0) -> None:
        """What a stage trains: the selection as params (granularity, ratio, seed, trained
        fractions; or the adapters) and whole as selection.json."""
        self.log_params(run_id, selection_params(selection, replay))
        self.client.log_dict(run_id, selection, "selection.json")

    def log_params(self, run_id: str, params: dict) -> None:
        flat = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=flat[start:start + 100])

    def log_training(self, run_id: str, losses: list[float], train_s: float, step_s: float,
                     memory: dict[str, float] | None = None) -> None:
        """The loss per step, the stage's times, and its memory peaks (each rank's host RSS, the GPU's)."""
        metrics = [Metric("train/loss", loss, 0, step) for step, loss in enumerate(losses, start=1)]
        metrics += [Metric("time/train_s", train_s, 0, 0), Metric("time/step_s", step_s, 0, 0)]
        metrics += [Metric(name, value, 0, 0) for name, value in (memory or {}).items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def watch_system(self, run_id: str) -> SystemMetrics:
        """CPU, memory (and GPU) use of this node into `run_id` every few seconds, as MLflow's
        system-metrics logging records them (`system/...`), until `.stop()`."""
        return SystemMetrics(run_id, self.tracking_uri)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        if metrics:
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items()])

    def log_file(self, run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_dir)

    def log_json(self, run_id: str, content, artifact_file: str) -> None:
        self.client.log_dict(run_id, content, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def tag_node(self, run_id: str, work: str, node: str) -> None:
        """`hft.<work>_node`: the Ray node id that trained or evaluated the stage (when known)."""
        if node:
            self.client.set_tag(run_id, f"hft.{work}_node", node)

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")

    def reopen(self, run_id: str, attempt: int) -> None:
        """Mark a run of a resumed pipeline RUNNING again; `hft.attempt` counts the resumes."""
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "hft.attempt", str(attempt))
        if "hft.error" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "hft.error")

    def find_resumable(self, kind: str, pipeline: str, run_id: str | None = None):
        """The run to resume: `run_id`, else the newest unfinished `kind` run ("pipeline" or
        "tune") of `pipeline`."""
        if run_id:
            return self.client.get_run(run_id)
        runs = self.client.search_runs([self.experiment_id], f"tags.`hft.kind` = '{kind}' and "
                                       f"tags.`hft.pipeline` = '{pipeline}' and attributes.status != 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def fail(self, run_id: str, reason: str) -> None:
        """End a run FAILED with the reason as a tag (never leave it RUNNING)."""
        self.client.set_tag(run_id, "hft.error", reason[:5000])
        self.client.set_terminated(run_id, "FAILED")


def selection_params(selection: dict, replay: float = 0.0) -> dict:
    """A stage's selection.json, cut to the params worth comparing runs by."""
    params = {"kind": selection["kind"]}
    if selection["kind"] == "hft":
        params.update({k: selection[k] for k in ("granularity", "ratio", "seed", "stage", "strategy")})
        params["trained_fraction_by_params"] = selection["fractions"]["by_params"]["overall"]
        params["trained_fraction_by_matrices"] = selection["fractions"]["by_matrices"]["overall"]
        if selection.get("reselect_every"):
            params["reselect_every"] = selection["reselect_every"]
    params.update({k: selection[k] for k in ("r", "alpha", "dropout") if k in selection})
    if replay:
        params["replay"] = replay
    return params


class SystemMetrics:
    SAMPLE_EVERY_S = 5

    def __init__(self, run_id: str, tracking_uri: str):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # a start and stop line per stage
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=self.SAMPLE_EVERY_S, tracking_uri=tracking_uri)
        self.monitor.start()

    def stop(self) -> None:
        """Stop, with one last sample, so a stage shorter than a sampling interval has one too."""
        self.monitor.finish()
        self.monitor.collect_metrics()
        self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        self.monitor.mlflow_logger.flush()


def latest_pipeline_run(client: MlflowClient, run_id: str | None = None):
    """The given run, or the newest pipeline run in any experiment of the store."""
    if run_id:
        return client.get_run(run_id)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`hft.kind` = 'pipeline'", order_by=["attributes.start_time DESC"],
                              max_results=1) if experiments else []
    return runs[0] if runs else None


def load_artifact_json(client: MlflowClient, run_id: str, path: str):
    with tempfile.TemporaryDirectory() as folder:
        local = client.download_artifacts(run_id, path, folder)
        return json.loads(Path(local).read_text())


class SearchTracker(Tracker):
    """The MLflow layout of `hft-ray tune`: a parent run (hft.kind=tune) and a child run per
    trial (hft.kind=trial), found again by its trial id after `tune --resume`."""

    def start_search(self, pipeline: str, run_name: str, params: dict, files: dict[str, str], output_dir: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "hft.kind": "tune", "hft.pipeline": pipeline, "hft.output_dir": output_dir})
        self.log_params(run.info.run_id, params)
        for name, text in files.items():
            self.client.log_text(run.info.run_id, text, name)
        return run.info.run_id

    def trial_runs(self, parent_id: str) -> list:
        parent = self.client.get_run(parent_id)
        return self.client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                       order_by=["attributes.start_time ASC"])

    def trial_run(self, parent_id: str, trial_id: str, name: str, config: dict) -> tuple[str, int]:
        """The trial's child run and the last stage it has logged: an earlier attempt's (reopened)
        or a new one."""
        for run in self.trial_runs(parent_id):
            if run.data.tags.get("hft.trial_id") == trial_id:
                if run.info.status != "RUNNING":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                history = self.client.get_metric_history(run.info.run_id, "objective")
                return run.info.run_id, max((m.step for m in history), default=0)
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": parent_id, "hft.kind": "trial", "hft.trial_id": trial_id})
        self.log_params(run.info.run_id, config)
        return run.info.run_id, 0

    def end_trial(self, run_id: str, stages_done: int, total: int, matrix: dict | None) -> str:
        """FINISHED after every stage, else KILLED with hft.stopped_early (the scheduler stopped it)."""
        if matrix is not None:
            self.client.log_dict(run_id, matrix, "forgetting/trial.json")
        early = stages_done < total
        self.client.set_tag(run_id, "hft.stopped_early", str(early).lower())
        self.client.set_tag(run_id, "hft.stages_done", str(stages_done))
        self.client.set_terminated(run_id, "KILLED" if early else "FINISHED")
        return "stopped_early" if early else "finished"
