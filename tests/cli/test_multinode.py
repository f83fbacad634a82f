"""Beyond one node, on real parts:

- an S3-compatible server (moto, IAM authentication on) that holds every file of a run: a
  one-node `hft-ray run` with `--storage-path s3://...`, its driver killed after the first stage
  and the run resumed from the store with `--resume`;
- two Ray nodes on this machine (`ray start --head` + `ray start --address`), where custom
  resources send a branch's stages to one node and its evaluations to the other; the same
  pipeline submitted with `hft-ray submit --wait`, its storage in the same store, logged through
  `hft-ray ui --artifacts-destination s3://...`, and its matrix equal to the one-node run's.

Every server is started here on loopback and stopped by killing its own process group.
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

import pytest
import transformers
from mlflow.tracking import MlflowClient
from servers import HFT_RAY, client_env, free_port, ray_nodes, start_head, start_worker_node, stop_group

PIPELINE = """\
name: beyond-one-node
model: {source: builtin:tiny-llama}
domains:
  upper: {source: builtin:upper, eval_size: 16}
  caesar: {source: builtin:caesar, eval_size: 16}
stages: [{domain: upper, steps: 30}, {domain: caesar, steps: 30}]
train: {lr: 2.0e-3, batch_size: 32, max_length: 32, log_every: 5, checkpoint_every: 10}
methods: {hft: {kind: hft}}
eval: {metric: token_accuracy, max_new_tokens: 8, max_examples: 16}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    (folder / "pipeline.yaml").write_text(PIPELINE)
    return folder


def hft_ray_run(project: Path, s3, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([*HFT_RAY, "run", "pipeline.yaml", "--tracking-uri", f"sqlite:///{project}/mlflow.db",
                             "--json", *args], cwd=project, env={**os.environ, **s3.env, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


@pytest.fixture(scope="module")
def one_node(project, s3):
    """A one-node run storing in s3://BUCKET/one, its driver killed once stage 1 is evaluated,
    then resumed from what the store holds."""
    storage = f"s3://{s3.bucket}/one"
    driver, log = hft_ray_run(project, s3, "--storage-path", storage), []
    try:
        for line in driver.stderr:
            log.append(line)
            if "[hft-ray] hft after stage 1:" in line:
                os.kill(driver.pid, signal.SIGKILL)  # the driver alone, mid-pipeline
                break
        driver.wait(timeout=60)
    finally:
        stop_group(driver)  # and the embedded Ray it leaves behind, as a reboot would
    assert driver.returncode == -signal.SIGKILL, "".join(log)[-3000:]
    resumed = hft_ray_run(project, s3, "--storage-path", storage, "--resume")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    result = json.loads(out)
    return {"result": result, "stderr": err, "first": "".join(log), "client": MlflowClient(f"sqlite:///{project}/mlflow.db"),
            "prefix": result["output_dir"].removeprefix(f"s3://{s3.bucket}/")}


def test_every_file_of_the_run_is_in_the_store_and_none_here(project, s3, one_node):
    prefix, keys = one_node["prefix"], s3.keys("one/")
    assert prefix.startswith("one/beyond-one-node-")
    for stage in ("base", "hft/stage-1", "hft/stage-2"):
        files = ("config.json", "model.safetensors", "tokenizer.json")
        assert {f"{prefix}/{stage}/{name}" for name in files} <= set(keys)
    assert {f"{prefix}/manifest.json", f"{prefix}/result.json", f"{prefix}/hft/stage-2/plan.json"} <= set(keys)
    # Ray Train's storage: the resumable checkpoints taken every 10 steps went to the store too.
    assert any(k.startswith(f"{prefix}/ray/") and k.endswith("/progress.json") for k in keys), keys
    assert not (project / "hft_runs").exists(), "no local folder stands in for the store"


def test_the_resume_continued_the_same_runs_from_the_store(s3, one_node):
    client, result = one_node["client"], one_node["result"]
    assert "[hft-ray] hft: stages 1-" in one_node["stderr"] and "done in an earlier attempt" in one_node["stderr"]
    assert "[hft-ray] hft stage 1/2 (upper): training" not in one_node["stderr"]
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["hft.attempt"] == "1"
    assert parent.data.tags["hft.output_dir"] == result["output_dir"]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["hft.stage"] for c in children) == ["1", "2"]
    assert all(c.info.status == "FINISHED" and "eval/caesar" in c.data.metrics for c in children)
    key = f"{one_node['prefix']}/manifest.json"
    manifest = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    assert manifest["attempt"] == 1 and all(s.get("row") for s in manifest["branches"]["hft"]["stages"].values())


def test_the_last_checkpoint_loads_with_from_pretrained(s3, one_node, tmp_path):
    folder = s3.download(f"{one_node['prefix']}/hft/stage-2", tmp_path / "stage-2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert model.config.model_type == "llama" and (folder / "train_log.json").is_file()


def test_no_credential_is_written_into_mlflow_or_the_manifest(project, s3, one_node):
    client, parent_id = one_node["client"], one_node["result"]["parent_run_id"]
    parent = client.get_run(parent_id)
    runs = [parent, *client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")]
    written = [json.dumps([r.data.params, r.data.tags]) for r in runs]
    key = f"{one_node['prefix']}/manifest.json"
    written.append(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode())
    written.append(Path(client.download_artifacts(parent_id, "pipeline.yaml", str(project))).read_text())
    for secret in (s3.env["AWS_SECRET_ACCESS_KEY"], s3.env["AWS_ACCESS_KEY_ID"]):
        assert not any(secret in text for text in written)


@pytest.mark.parametrize("storage,env,expected", [
    ("s3://{bucket}/refused", {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "The store refused the credentials"),
    ("s3://no-such-bucket/runs", {}, "NO_SUCH_BUCKET"),
], ids=["wrong-secret", "missing-bucket"])
def test_a_store_that_refuses_the_run_exits_2_before_anything_starts(tmp_path, s3, storage, env, expected):
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    run = hft_ray_run(tmp_path, s3, "--storage-path", storage.format(bucket=s3.bucket), env=env)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2, err[-3000:]
    assert f"output.dir {storage.format(bucket=s3.bucket)}: cannot write there" in err and expected in err
    assert "Traceback" not in err and not (tmp_path / "mlflow.db").exists()


# -- two nodes ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3):
    """`hft-ray ui` whose artifacts go to s3://BUCKET/mlflow (the server alone needs the keys)."""
    folder, port = tmp_path_factory.mktemp("mlflow"), free_port()
    ui = subprocess.Popen([*HFT_RAY, "ui", "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--port", str(port),
                           "--artifacts-destination", f"s3://{s3.bucket}/mlflow"], env={**os.environ, **s3.env},
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert ui.stdout.readline().startswith("MLflow UI for"), "the server started"
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(ui)


@pytest.mark.parametrize("destination,expected", [
    ("s3://KEY:hunter2@bucket/mlflow", "--artifacts-destination: the URI carries credentials"),
    ("s3://no-such-bucket/mlflow", "--artifacts-destination s3://no-such-bucket/mlflow: cannot write there"),
], ids=["credentials-in-the-uri", "missing-bucket"])
def test_ui_refuses_an_artifacts_destination_it_cannot_use(tmp_path, s3, destination, expected):
    result = subprocess.run([*HFT_RAY, "ui", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--port", str(free_port()),
                             "--artifacts-destination", destination], env={**os.environ, **s3.env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def two_nodes(s3):
    """A head with the `evaluator` resource and a second node with the `trainer` resource: a
    branch's workers can only run on the second, its evaluations only on the head."""
    temp = Path(tempfile.mkdtemp(prefix="hr2-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head, info = start_head(temp, secrets.token_hex(16), cpus=1, resources={"evaluator": 2}, env=s3.env,
                            nodes=2)
    worker = None
    try:
        worker = start_worker_node(info, cpus=2, resources={"trainer": 2}, env=s3.env)
        deadline = time.monotonic() + 120
        while len(ray_nodes(info)) < 2:
            assert worker.poll() is None and time.monotonic() < deadline, (temp / "worker.log").read_text()[-3000:]
            time.sleep(1)
        yield info
    finally:
        for process in (worker, head):
            if process is not None:
                stop_group(process)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(project, s3, two_nodes, mlflow_server):
    result = subprocess.run(
        [*HFT_RAY, "submit", "pipeline.yaml", "--address", two_nodes["address"], "--wait",
         "--tracking-uri", mlflow_server, "--storage-path", f"s3://{s3.bucket}/two",
         "--set", "train.resources_per_worker={trainer: 1}", "--set", "eval.resources={evaluator: 1}"],
        capture_output=True, text=True, timeout=900, cwd=project, env=client_env(two_nodes["token"], s3.env))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith(("job: ", "mlflow run: ")))
    return {"run": ids["mlflow run"], "client": MlflowClient(mlflow_server), "stdout": result.stdout}


def test_stages_trained_on_one_node_and_were_evaluated_on_the_other(two_nodes, submitted):
    nodes = {("trainer" if "trainer" in n["resources_total"] else "evaluator"): n["node_id"]
             for n in ray_nodes(two_nodes)}
    assert len(set(nodes.values())) == 2, nodes
    client, parent_id = submitted["client"], submitted["run"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 2
    for child in children:
        assert child.data.tags["hft.train_node"] == nodes["trainer"], child.data.tags
        assert child.data.tags["hft.eval_node"] == nodes["evaluator"], child.data.tags


def test_the_two_node_matrix_equals_the_one_node_runs(mlflow_server, submitted, one_node):
    # As the UI reads an artifact: through the server, which reads it from the store. (MLflow's
    # client would fetch it from a presigned URL instead, which moto cannot check with IAM on.)
    url = f"{mlflow_server}/get-artifact?path=forgetting/hft.json&run_uuid={submitted['run']}"
    with urllib.request.urlopen(url, timeout=60) as response:
        matrix = json.load(response)
    assert matrix == one_node["result"]["methods"]["hft"]["matrix"]


def test_checkpoints_and_mlflow_artifacts_live_side_by_side_in_the_store(s3, submitted):
    keys = s3.keys("")
    assert any(re.fullmatch(r"two/beyond-one-node-[^/]+/hft/stage-2/model\.safetensors", k) for k in keys)
    assert any(re.fullmatch(rf"mlflow/\d+/{submitted['run']}/artifacts/forgetting/hft\.png", k) for k in keys), \
        [k for k in keys if k.startswith("mlflow/")]
