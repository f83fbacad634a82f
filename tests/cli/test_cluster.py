"""`hft-ray submit` and `hft-ray ui` end to end, on the real things: a Ray head started with
`ray start --head` (loopback, its own temp dir and ports, token authentication on), Ray Jobs,
an MLflow server, and a headless Chromium loading the run's page.

The head is stopped by killing the process group it was started in: only its own processes.
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from servers import HFT_RAY, client_env, free_port, start_head, stop_group

from hft_ray.cli.submit import job_exit_code

ARTIFACTS = Path(os.environ.get("HFT_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster on loopback with token authentication on. It declares one T4 GPU, as Ray
    names a detected one (`accelerator_type:T4`), for the memory preflight's cluster check; nothing
    here asks for a GPU but that check."""
    temp = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head, info = start_head(temp, secrets.token_hex(16), cpus=2, gpus=1, resources={"accelerator_type:T4": 1})
    try:
        yield info
    finally:
        stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def jobs(head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's folder: a small pipeline that names a local data file."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "data").mkdir()
    rows = [{"prompt": f"N {w}:", "completion": f" {w[::-1]}"} for w in
            ("abc", "hello", "ray", "mlflow", "torch", "stage", "half", "tune", "domain", "loss", "model", "query")]
    (folder / "data" / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (folder / "pipeline.yaml").write_text("""\
name: cluster-smoke
model: {source: builtin:tiny-llama}
domains:
  notes: {source: {path: data/notes.jsonl}, eval_size: 8}
  upper: {source: builtin:upper, eval_size: 8}
stages:
  - {domain: notes, steps: 4}
train: {lr: 2.0e-3, batch_size: 8, max_length: 32, log_every: 2}
methods:
  hft: {kind: hft, granularity: category, ratio: 0.5}
eval: {max_new_tokens: 6, max_examples: 8}
""")
    return folder


@pytest.fixture(scope="module")
def submitted(ray_head, project):
    """`hft-ray submit --wait` of the project's pipeline, run from the project folder."""
    result = subprocess.run(
        [*HFT_RAY, "submit", "pipeline.yaml", "--address", ray_head["address"], "--wait",
         "--tracking-uri", f"sqlite:///{project}/mlflow.db", "--storage-path", str(project / "runs")],
        capture_output=True, text=True, timeout=600, cwd=project, env=client_env(ray_head["token"]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith(("job: ", "mlflow run: ")))
    return {"job": ids["job"], "run": ids["mlflow run"], "stdout": result.stdout, "stderr": result.stderr,
            "client": MlflowClient(f"sqlite:///{project}/mlflow.db")}


def test_submit_wait_streams_the_job_and_prints_its_ids(ray_head, submitted):
    assert "[hft-ray] hft stage 1/1 (notes): step 4/4 loss" in submitted["stdout"], "the job's logs are streamed"
    assert "carried data/notes.jsonl with the job" in submitted["stderr"]
    info = jobs(ray_head).get_job_info(submitted["job"])
    assert str(info.status) == "SUCCEEDED" and info.driver_exit_code == 0
    assert info.entrypoint.startswith("python -m hft_ray run pipeline.yaml --tracking-uri sqlite:///")


def test_the_job_records_mlflow_runs_and_checkpoints_where_told(project, submitted):
    client = submitted["client"]
    parent = client.get_run(submitted["run"])
    assert parent.info.status == "FINISHED" and parent.data.tags["hft.pipeline"] == "cluster-smoke"
    assert parent.data.params["domains.notes.source.path"].endswith("notes.jsonl")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [(c.data.tags["hft.method"], c.data.tags["hft.domain"], c.info.status) for c in children] == [
        ("hft", "notes", "FINISHED")]
    assert {"eval/notes", "eval/upper"} <= set(children[0].data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "forgetting")} >= {"forgetting/hft.png",
                                                                                        "forgetting/hft.json"}
    runs = [folder for folder in (project / "runs").iterdir() if folder.name != "tokens"]  # tokens: the data's
    assert len(runs) == 1 and (runs[0] / "result.json").is_file() and (runs[0] / "base").is_dir()
    assert len(list((project / "runs" / "tokens").iterdir())) == 2, "notes and upper, tokenized once each"


def test_a_bad_file_is_refused_before_anything_is_submitted(ray_head, project):
    before = len(jobs(ray_head).list_jobs())
    result = subprocess.run([*HFT_RAY, "submit", "pipeline.yaml", "--address", ray_head["address"],
                             "--set", "train.lr=-1", "--set", "stages.0.domain=nowhere"],
                            capture_output=True, text=True, timeout=120, cwd=project, env=client_env(ray_head["token"]))
    assert result.returncode == 2, result.stderr
    assert "train.lr" in result.stderr and "'nowhere' is not a domain" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(jobs(ray_head).list_jobs()) == before


def test_a_wrong_token_is_refused_with_exit_2(ray_head, project):
    result = subprocess.run([*HFT_RAY, "submit", "pipeline.yaml", "--address", ray_head["address"]],
                            capture_output=True, text=True, timeout=120, cwd=project, env=client_env("not-the-token"))
    assert result.returncode == 2
    assert "refused the Ray token" in result.stderr and "Traceback" not in result.stderr


def test_no_wait_returns_with_the_ids_and_a_failing_job_ends_failed(ray_head, project):
    """Without --wait the command returns once the job names its MLflow run. This job fails at
    run time (the loss diverges): the job ends FAILED with exit code 1, and so does the run."""
    result = subprocess.run([*HFT_RAY, "submit", "pipeline.yaml", "--address", ray_head["address"],
                             "--set", "train.lr=1e12", "--tracking-uri", f"sqlite:///{project}/mlflow.db",
                             "--storage-path", str(project / "failing")],
                            capture_output=True, text=True, timeout=300, cwd=project, env=client_env(ray_head["token"]))
    ids = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert result.returncode in (0, 1), result.stderr  # 1 only if the job failed before the command returned
    assert len(ids["mlflow run"]) == 32, result.stdout
    client = jobs(ray_head)
    deadline = time.monotonic() + 300
    while not client.get_job_status(ids["job"]).is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
    info = client.get_job_info(ids["job"])
    assert str(info.status) == "FAILED" and info.driver_exit_code == 1 and job_exit_code(info) == 1
    assert "loss is" in client.get_job_logs(ids["job"])
    run = MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(ids["mlflow run"])
    assert run.info.status == "FAILED" and "loss is" in run.data.tags["hft.error"]


def test_ui_serves_the_run_its_heatmap_and_its_page(project, submitted):
    port = free_port()
    ui = subprocess.Popen([*HFT_RAY, "ui", "--tracking-uri", f"sqlite:///{project}/mlflow.db", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        announced = f"MLflow UI for sqlite:///{project}/mlflow.db: open {base} (Ctrl-C stops it)"
        assert ui.stdout.readline().strip() == announced
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}, "the UI binds loopback only, unless told otherwise"
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={submitted['run']}") as response:
            run = json.load(response)["run"]
        assert run["info"]["status"] == "FINISHED"
        assert {m["key"] for m in run["data"]["metrics"]} >= {"hft.OP", "hft.heldout_delta"}
        heatmap = f"{base}/get-artifact?path=forgetting/hft.png&run_uuid={submitted['run']}"
        with urllib.request.urlopen(heatmap) as response:
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            missing = "Chromium is not installed (apt-get install chromium; .ci/run does): the page is not checked"
            if os.environ.get("CI"):
                pytest.fail(missing)  # CI installs it; a check it relies on must not vanish as a skip
            pytest.skip(missing)
        experiment = run["info"]["experiment_id"]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "mlflow-run-page.png"
        shot.unlink(missing_ok=True)
        page = f"{base}/#/experiments/{experiment}/runs/{submitted['run']}/artifacts/forgetting/hft.png"
        headless = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--disable-background-networking", "--no-first-run", "--window-size=1400,900",
                    "--virtual-time-budget=20000"]
        # The page as the browser rendered it (the UI is a script-built page: its served HTML names no run).
        dom = subprocess.run([*headless, "--dump-dom", page], capture_output=True, text=True, timeout=180,
                             check=True).stdout
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom,
                                                                  flags=re.S)))
        for shown in (f"Run {submitted['run']}", "forgetting/hft.png", "hft.json", "comparison.png", "pipeline.yaml"):
            assert shown in text, f"{shown!r} not on the rendered run page: {text[:1500]}"
        subprocess.run([*headless, f"--screenshot={shot}", page], capture_output=True, timeout=180, check=True)
        assert shot.stat().st_size > 20_000, "a rendered page, not a blank one"
    finally:
        ui.send_signal(signal.SIGINT)  # as Ctrl-C: hft-ray stops its server
        ui.wait(timeout=60)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/health", timeout=2)


def test_a_branch_that_cannot_fit_the_clusters_gpus_exits_2_before_anything_starts(ray_head, project):
    """The submitting machine has no GPU, so only the job's driver, on the cluster, knows the GPUs
    the workers get: a T4 (16 GiB at most). Llama-3.2-1B's shapes trained whole in fp32 need more:
    the job exits 2 naming the estimate, the GPU and what would fit, before any worker starts."""
    import transformers

    from hft_ray.train.models import char_tokenizer

    folder = project / "llama-1b-shapes"  # the structure is all the check reads: no weights
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128_256)
    config.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    pipeline = (project / "pipeline.yaml").read_text().replace("builtin:tiny-llama", "./llama-1b-shapes")
    pipeline = pipeline.replace("train: {", "train: {use_gpu: true, precision: fp32, ")
    (project / "big.yaml").write_text(pipeline.replace("hft: {kind: hft, granularity: category, ratio: 0.5}",
                                                       "fft: {kind: fft}"))
    result = subprocess.run([*HFT_RAY, "submit", "big.yaml", "--address", ray_head["address"], "--wait",
                             "--tracking-uri", f"sqlite:///{project}/big.db", "--storage-path", str(project / "big")],
                            capture_output=True, text=True, timeout=300, cwd=project, env=client_env(ray_head["token"]))
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "methods.fft: needs about" in out and "more than the cluster's T4 GPUs (up to) 16 GiB" in out, out[-3000:]
    assert "would fit: " in out and "train.strategy: fsdp with train.workers: 8" in out and "Traceback" not in out
    assert not (project / "big").exists() or not any((project / "big").rglob("model.safetensors")), "nothing trained"
