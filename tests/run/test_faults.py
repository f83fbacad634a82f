"""Faults, really caused: a Ray Train worker killed by its pid mid-stage, and the driver killed
mid-pipeline then resumed with `hft-ray run --resume`. Outcomes are read back from MLflow and
the run's manifest."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

HFT_RAY = [sys.executable, "-m", "hft_ray"]
WORKER_LINE = re.compile(r"RayTrainWorker pid=(\d+)\).*hft stage 1/1 \(upper\): step (\d+)/")


def write_pipeline(folder: Path, stages: str, methods: str, checkpoint_every: int = 0, train: str = "") -> Path:
    path = folder / "faults.yaml"
    path.write_text(f"""\
name: faults
model: {{source: builtin:tiny-llama}}
domains:
  upper: {{source: builtin:upper, eval_size: 16}}
  caesar: {{source: builtin:caesar, eval_size: 16}}
stages: {stages}
train: {{lr: 2.0e-3, batch_size: 32, max_length: 32, log_every: 5, checkpoint_every: {checkpoint_every}{train}}}
methods: {methods}
eval: {{metric: token_accuracy, max_new_tokens: 8, max_examples: 16}}
output: {{dir: {folder / 'runs'}}}
""")
    return path


def start(pipeline: Path, folder: Path, *extra: str) -> subprocess.Popen:
    """`hft-ray run --json` in its own process group (it and the Ray it embeds)."""
    return subprocess.Popen([*HFT_RAY, "run", str(pipeline), "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
                             "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=folder, start_new_session=True)


def children(client: MlflowClient, parent_id: str):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


SHARDED = ", workers: 2, strategy: fsdp, precision: bf16, gradient_checkpointing: true"


@pytest.mark.parametrize("train,steps", [("", 400), (SHARDED, 150)], ids=["ddp-1-worker", "fsdp-2-workers-bf16"])
def test_a_killed_worker_is_restarted_from_the_stages_last_checkpoint(tmp_path, train, steps):
    # Long enough that the kill lands mid-stage even when Ray forwards the worker's lines late.
    pipeline = write_pipeline(tmp_path, f"[{{domain: upper, steps: {steps}}}]", "{hft: {kind: hft}}",
                              checkpoint_every=20, train=train)
    driver = start(pipeline, tmp_path, "--verbose")  # Ray's worker lines (with their pids) and notices
    killed, checkpointed, log = None, None, []
    try:
        for line in driver.stderr:
            log.append(line)
            if checkpointed is None and "Checkpoint successfully created" in line:
                checkpointed = time.monotonic()
            match = WORKER_LINE.search(line)
            # Ray Train's controller takes a reported checkpoint up when it polls the workers
            # (every 2 s): kill once the first one has surely been taken up.
            if match and killed is None and checkpointed and time.monotonic() - checkpointed > 6:
                killed = int(match.group(1))
                os.kill(killed, signal.SIGKILL)
        out, code = driver.stdout.read(), driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = "".join(log)
    assert killed is not None, f"no worker line came 6 s after the first checkpoint:\n{text[-3000:]}"
    assert code == 0, text[-3000:]
    resumed = re.search(r"resuming at step (\d+) after a worker failure", text)
    assert resumed, text[-3000:]
    step = int(resumed.group(1))
    assert step > 1 and (step - 1) % 20 == 0, "it resumes just after a checkpoint, not from the start"
    result = json.loads(out)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (stage,) = children(client, result["parent_run_id"])
    history = client.get_metric_history(stage.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, steps + 1)), "every step's loss logged once"
    assert stage.info.status == "FINISHED" and client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    matrix = result["methods"]["hft"]["matrix"]
    assert len(matrix["scores"]) == 2 and all(len(row) == 2 for row in matrix["scores"])


def test_a_killed_driver_is_resumed_without_redoing_or_duplicating_anything(tmp_path):
    stages = "[{domain: upper, steps: 30}, {domain: caesar, steps: 30}]"
    pipeline = write_pipeline(tmp_path, stages, "{fft: {kind: fft}, hft: {kind: hft}}")
    driver = start(pipeline, tmp_path)
    parent_id, log = None, []
    try:
        for line in driver.stderr:
            log.append(line)
            parent_id = parent_id or (m.group(1) if (m := re.search(r"MLflow parent run ([0-9a-f]{32})", line)) else None)
            if re.search(r"\[hft-ray\] (fft|hft) after stage 1:", line):
                os.kill(driver.pid, signal.SIGKILL)  # the driver alone, mid-pipeline
                break
        driver.wait(timeout=60)
        time.sleep(2)
    finally:
        try:  # and then the embedded Ray it leaves behind, as a reboot would
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert driver.returncode == -signal.SIGKILL, "".join(log)[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(parent_id).info.status == "RUNNING", "a killed driver cannot end its run"
    before = {(c.data.tags["hft.method"], c.data.tags["hft.stage"]): c for c in children(client, parent_id)}
    evaluated = {key for key, c in before.items() if "eval/upper" in c.data.metrics}
    assert evaluated, "at least one stage was finished and evaluated before the kill"

    resumed = subprocess.run([*HFT_RAY, "run", str(pipeline), "--resume", "--tracking-uri",
                              f"sqlite:///{tmp_path}/mlflow.db", "--json"],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout)
    assert result["parent_run_id"] == parent_id
    for method, index in evaluated:
        # Stage 2 trains while stage 1 is evaluated, so it may have finished before the kill too.
        done = re.search(rf"\[hft-ray\] {method}: stages 1-(\d) done in an earlier attempt", resumed.stderr)
        assert done and int(done.group(1)) >= int(index), resumed.stderr[-3000:]
        assert f"[hft-ray] {method} stage {index}/2 (upper): training" not in resumed.stderr
    after = {(c.data.tags["hft.method"], c.data.tags["hft.stage"]): c for c in children(client, parent_id)}
    assert sorted(after) == [("fft", "1"), ("fft", "2"), ("hft", "1"), ("hft", "2")], "no duplicated child run"
    for key, run in after.items():
        assert run.info.status == "FINISHED"
        if key in before:
            assert run.info.run_id == before[key].info.run_id, "child runs are reused"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == list(range(1, 31)), f"{key}: losses logged once"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["hft.attempt"] == "1"
    for method in ("fft", "hft"):
        assert len(result["methods"][method]["matrix"]["scores"]) == 3
    manifest = json.loads((Path(parent.data.tags["hft.output_dir"]) / "manifest.json").read_text())
    assert all(entry.get("row") for b in manifest["branches"].values() for entry in b["stages"].values())

    again = subprocess.run([*HFT_RAY, "run", str(pipeline), "--resume", "--tracking-uri",
                            f"sqlite:///{tmp_path}/mlflow.db"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "no unfinished run of pipeline 'faults'" in again.stderr


@pytest.mark.parametrize("args,expected", [
    (["--resume", "0" * 32], "--resume 00000000000000000000000000000000: no such run"),
    (["--resume"], "--resume: no unfinished run of pipeline 'faults'"),
])
def test_resume_refuses_what_it_cannot_continue(tmp_path, args, expected):
    pipeline = write_pipeline(tmp_path, "[{domain: upper, steps: 3}]", "{hft: {kind: hft}}")
    result = subprocess.run([*HFT_RAY, "run", str(pipeline), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                             *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
