"""The main path end to end: `hft-ray run` on real Ray, real MLflow (sqlite), real training."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from hft_ray.core.metrics import ForgettingMatrix

SMOKE = Path(__file__).parents[2] / "pipelines" / "smoke.yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One run of the smoke pipeline (2 methods x 2 stages) through the console script, `upper`'s
    rows from a file, keeping each branch's last stage checkpoint only."""
    import random

    from hft_ray.data.domains import BUILTIN_DOMAINS

    folder = tmp_path_factory.mktemp("e2e")
    rows = BUILTIN_DOMAINS["upper"].generate(random.Random(0), 400)
    (folder / "upper.jsonl").write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                                                for e in rows))
    uri = f"sqlite:///{folder}/mlflow.db"
    result = subprocess.run(
        ["hft-ray", "run", str(SMOKE), "--tracking-uri", uri, "--json", "--set", f"output.dir={folder}/runs",
         "--set", f"domains.upper.source={{path: {folder}/upper.jsonl}}", "--set", "output.keep=last"],
        capture_output=True, text=True, timeout=900, cwd=folder,
        env={**os.environ, "HFT_RAY_DRIVER_LOG": str(folder / "driver.log")})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), MlflowClient(uri), result.stderr


def test_progress_names_branch_stage_and_loss(finished_run):
    _, _, stderr = finished_run
    for line in ("fft stage 1/2 (upper): training", "hft stage 2/2 (caesar): step 20/20 loss",
                 "hft stage 2/2 done: loss"):
        assert line in stderr


def test_parent_and_child_runs_follow_the_layout(finished_run):
    out, client, _ = finished_run
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hft.kind"] == "pipeline" and parent.data.tags["hft.pipeline"] == "smoke"
    assert parent.data.params["train.lr"] == "0.002"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    tags = sorted((c.data.tags["hft.method"], c.data.tags["hft.stage"], c.data.tags["hft.domain"]) for c in children)
    assert tags == [("fft", "1", "upper"), ("fft", "2", "caesar"), ("hft", "1", "upper"), ("hft", "2", "caesar")]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["hft.kind"] == "stage"
        logged = set(child.data.metrics)
        assert {"eval/facts", "eval/upper", "eval/caesar", "time/train_s", "time/step_s", "train/loss"} <= logged
        assert 0.2 < child.data.metrics["memory/host_peak_gb/rank0"] < 16, "the worker's peak RSS in the stage"
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in history] == list(range(1, 21))
        selection = json.loads(Path(client.download_artifacts(child.info.run_id, "selection.json")).read_text())
        if child.data.tags["hft.method"] == "hft":
            assert child.data.params["granularity"] == "category"
            assert selection["fractions"]["by_matrices"]["selectable"] == 0.5
            assert selection["stage"] == int(child.data.tags["hft.stage"])
    hft_plans = [json.loads(Path(client.download_artifacts(c.info.run_id, "selection.json")).read_text())["trained"]
                 for c in children if c.data.tags["hft.method"] == "hft"]
    assert hft_plans[0] != hft_plans[1], "every stage draws a new plan"


def test_matrices_are_logged_and_summary_metrics_match_them(finished_run):
    out, client, _ = finished_run
    run_id = out["parent_run_id"]
    metrics = client.get_run(run_id).data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id, "forgetting")}
    assert {"forgetting/fft.json", "forgetting/fft.csv", "forgetting/fft.png", "forgetting/hft.png",
            "forgetting/comparison.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id)} >= {"pipeline.yaml", "forgetting"}
    for method in ("fft", "hft"):
        data = json.loads(Path(client.download_artifacts(run_id, f"forgetting/{method}.json")).read_text())
        R = data["scores"]
        assert data["columns"] == ["facts", "upper", "caesar"] and len(R) == 3
        assert all(0.0 <= x <= 1.0 for row in R for x in row)
        # Recomputed by hand from the artifact: stage 1 trains upper (column 1), stage 2 caesar (column 2).
        op = (R[2][1] + R[2][2]) / 2
        bwt = R[2][1] - R[1][1]
        heldout = R[2][0] - R[0][0]
        assert metrics[f"{method}.OP"] == pytest.approx(op)
        assert metrics[f"{method}.BWT"] == pytest.approx(bwt)
        assert metrics[f"{method}.heldout_delta"] == pytest.approx(heldout)
        assert ForgettingMatrix.from_dict(data).to_dict() == out["methods"][method]["matrix"]


def test_no_run_is_left_running(finished_run):
    out, client, _ = finished_run
    experiment = client.get_run(out["parent_run_id"]).info.experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")


def test_keep_last_leaves_each_branchs_last_checkpoint_and_the_base(finished_run):
    out, _, _ = finished_run
    folder = Path(out["output_dir"])
    stages = json.loads((folder / "manifest.json").read_text())["branches"]
    for method in ("fft", "hft"):
        assert not (folder / method / "stage-1").exists() and stages[method]["stages"]["1"]["removed"]
        assert (folder / method / "stage-2" / "model.safetensors").is_file()
    assert (folder / "base" / "model.safetensors").is_file()


def test_the_final_checkpoint_loads_with_from_pretrained(finished_run):
    out, _, _ = finished_run
    manifest = json.loads((Path(out["output_dir"]) / "manifest.json").read_text())
    checkpoint = Path(manifest["branches"]["hft"]["stages"]["2"]["checkpoint"])
    assert (checkpoint / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True)
    assert model.config.model_type == "llama"


def test_rays_own_lines_stay_in_its_logs_and_each_stage_run_has_system_metrics(finished_run):
    out, client, stderr = finished_run
    for line in ("Checkpoint successfully created", "Reporting training result", "PreemptionWatcher", "(raylet)",
                 "RayTrainWorker pid="):
        assert line not in stderr
    # A new store's and a new cluster's set-up notices go to the driver log, not the first screen.
    setup_notices = ("Creating initial MLflow database tables", "Token authentication is enabled")
    driver_log = (Path(client.tracking_uri.removeprefix("sqlite:///")).parent / "driver.log").read_text()
    for line in setup_notices:
        assert line not in stderr and line in driver_log
    experiment = client.get_run(out["parent_run_id"]).info.experiment_id
    for child in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'"):
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(child.data.metrics)


def test_report_prints_the_latest_run(finished_run):
    out, client, _ = finished_run
    result = subprocess.run(["hft-ray", "report", "--tracking-uri", client.tracking_uri, "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["run_id"] == out["parent_run_id"] and set(report["methods"]) == {"fft", "hft"}
    assert report["methods"]["hft"]["matrix"] == out["methods"]["hft"]["matrix"]


def test_each_domain_is_tokenized_once_and_every_stage_of_every_method_reads_its_folder(finished_run, capsys):
    """The preflight tokenizes each domain once (one line each); the four stage runs name the token
    folders they read (`data.tokens`): the same folder for a stage under both methods. Asked again
    (`hft-ray data`, the same inputs), every folder is found and nothing is written."""
    from hft_ray.cli import main

    out, client, stderr = finished_run
    tokens = Path(out["output_dir"]).parent / "tokens"
    folders = {f.name: (f / "rows.arrow").stat().st_mtime_ns for f in tokens.iterdir()}
    assert len(folders) == 3, "facts, upper, caesar"
    for domain in ("facts", "upper", "caesar"):
        assert stderr.count(f"domains.{domain}: ") == 1 and f"domains.{domain}: token folder" not in stderr
    parent = client.get_run(out["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    read = {(c.data.tags["hft.method"], c.data.tags["hft.stage"]): c.data.params["data.tokens"] for c in children}
    assert read[("fft", "1")] == read[("hft", "1")] != read[("fft", "2")] == read[("hft", "2")]
    assert set(read.values()) <= set(folders)
    pipeline = Path(out["output_dir"]) / "pipeline.yaml"
    pipeline.write_text(SMOKE.read_text())
    upper = Path(out["output_dir"]).parents[1] / "upper.jsonl"
    assert main(["data", str(pipeline), "--set", f"output.dir={tokens.parent}",
                 "--set", f"domains.upper.source={{path: {upper}}}"]) == 0
    said = capsys.readouterr().err
    assert all(f"domains.{d}: token folder" in said and "reused" in said for d in ("facts", "upper", "caesar"))
    assert {f.name: (f / "rows.arrow").stat().st_mtime_ns for f in tokens.iterdir()} == folders
