"""Faults, really caused: a Ray Train worker killed by its pid mid-stage, and the driver killed
mid-pipeline then resumed with `hft-ray run --resume`. Outcomes are read back from MLflow and
the run's manifest, and compared with an uninterrupted run of the same pipeline and seed: the
same loss at every step, the same weights."""

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

from hft_ray.train.checkpoints import is_whole

HFT_RAY = [sys.executable, "-m", "hft_ray"]
WORKER_LINE = re.compile(r"RayTrainWorker pid=(\d+)\).*hft stage 1/1 \(upper\): step (\d+)/")
CHECKPOINTED = re.compile(r"Checkpoint successfully created at: .*/ray/hft-")  # hft's Ray Train run, not control's
DOMAINS = {"1": "upper", "2": "caesar"}  # the stages' domains in the driver test

# The pipeline's branches trained in this process, one after another, from a base written as
# `hft-ray run` writes it, through the same planner and train function, without Ray or the driver:
# the uninterrupted run a resumed one must reproduce. Checkpoints under FOLDER/<method>/stage-<i>.
UNINTERRUPTED = """\
import sys
from pathlib import Path
from hft_ray.config.preflight import prepare
from hft_ray.config.spec import load_spec
from hft_ray.run.base import initial_checkpoint
from hft_ray.run.planner import Planner
from hft_ray.train.branch import train_branch
from hft_ray.train.channel import LocalChannel
pipeline, folder = Path(sys.argv[1]), Path(sys.argv[2])
prepared = prepare(load_spec(pipeline)[0], pipeline.parent)
planner = Planner(prepared.spec, prepared.domains, folder)
start = initial_checkpoint(prepared.spec, planner.folder)
for method in prepared.spec.methods:
    train_branch(planner.branch(method, 1, start), LocalChannel(folder / method, on_event=lambda event: None))
"""


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


def stage_runs(client: MlflowClient, parent_id: str) -> dict:
    """The parent run's child runs by (method, stage)."""
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {(r.data.tags["hft.method"], r.data.tags["hft.stage"]): r for r in runs}


def losses(client: MlflowClient, run) -> list[tuple[int, float]]:
    """The run's `train/loss` history, (step, loss) in step order: every value logged, repeats included."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))


def same_weights(first: str | Path, second: str | Path) -> bool:
    return (Path(first) / "model.safetensors").read_bytes() == (Path(second) / "model.safetensors").read_bytes()


def read_manifest(client: MlflowClient, parent_id: str) -> tuple[Path, dict]:
    folder = Path(client.get_run(parent_id).data.tags["hft.output_dir"])
    return folder, json.loads((folder / "manifest.json").read_text())


def check_manifest(client: MlflowClient, result: dict, attempt: int, stages: int) -> None:
    """The finished run's manifest records every (method, stage) as MLflow and the result do: its
    child run, its checkpoint (whole, where the branch writes it) and its evaluated row."""
    parent_id = result["parent_run_id"]
    folder, manifest = read_manifest(client, parent_id)
    assert (manifest["parent_run_id"], manifest["attempt"]) == (parent_id, attempt)
    assert manifest["bases"][""]["checkpoint"] == str(folder / "base") and is_whole(folder / "base")
    runs = stage_runs(client, parent_id)
    recorded = {(method, index): entry for method, branch in manifest["branches"].items()
                for index, entry in branch["stages"].items()}
    assert sorted(recorded) == sorted(runs) == sorted((m, str(i)) for m in result["methods"]
                                                      for i in range(1, stages + 1))
    for (method, index), entry in recorded.items():
        run, matrix = runs[method, index], result["methods"][method]["matrix"]
        assert entry.get("run_id") == run.info.run_id, (method, index)
        assert entry.get("checkpoint") == str(folder / method / f"stage-{index}") and is_whole(entry["checkpoint"])
        row = {(d, m): s for d, scores in entry.get("row", {}).items() for m, s in scores.items()}
        assert row == {tuple(k.split("/")[1:]): v for k, v in run.data.metrics.items() if k.startswith("eval_all/")}
        assert matrix["scores"][int(index)] == [entry["row"][d]["token_accuracy"] for d in matrix["columns"]]
        assert matrix["scores"][0] == [manifest["bases"][""]["scores"][d]["token_accuracy"] for d in matrix["columns"]]


SHARDED = ", workers: 2, strategy: fsdp, precision: bf16, gradient_checkpointing: true"


def test_a_killed_worker_is_restarted_from_the_stages_last_checkpoint(tmp_path):
    # 2 workers under fsdp, bf16, checkpointing: the restart reads every rank's shards. (One DDP
    # worker restarts through the same channel and progress files, from a whole checkpoint:
    # tests/train/test_branch.py crashes and resumes that in one process, without Ray.)
    # Long enough that the kill lands mid-stage even when Ray forwards the worker's lines late.
    # `control` is `hft` again (a method's name is not in its seeds), never killed: the
    # uninterrupted run, in the same `hft-ray run`.
    train, steps = SHARDED, 150
    pipeline = write_pipeline(tmp_path, f"[{{domain: upper, steps: {steps}}}]",
                              "{hft: {kind: hft}, control: {kind: hft}}", checkpoint_every=20, train=train)
    driver = start(pipeline, tmp_path, "--verbose")  # Ray's worker lines (with their pids) and notices
    killed, checkpointed, log = None, None, []
    try:
        for line in driver.stderr:
            log.append(line)
            if checkpointed is None and CHECKPOINTED.search(line):
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
    resumed = re.findall(r"(\w+) stage 1/1 \(upper\): resuming at step (\d+) after a worker failure", text)
    assert resumed and {method for method, _ in resumed} == {"hft"}, text[-3000:]
    step = int(resumed[-1][1])
    assert step > 1 and (step - 1) % 20 == 0, "it resumes just after a checkpoint, not from the start"
    result = json.loads(out)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = stage_runs(client, result["parent_run_id"])
    killed_run, control = losses(client, runs["hft", "1"]), losses(client, runs["control", "1"])
    assert [s for s, _ in killed_run] == list(range(1, steps + 1)), "every optimizer step's loss logged once"
    # Equal to the last bit, before the resumed step and after it: the same weights, AdamW state,
    # batches and learning rate as the uninterrupted run.
    assert killed_run == control
    assert control[-1][1] < control[0][1] / 2, "and it trained (equal because nothing happened would prove nothing)"
    output = Path(result["output_dir"])
    assert same_weights(output / "hft" / "stage-1", output / "control" / "stage-1")
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    matrices = {method: result["methods"][method]["matrix"] for method in ("hft", "control")}
    assert len(matrices["hft"]["scores"]) == 2 and matrices["hft"] == matrices["control"]
    check_manifest(client, result, attempt=0, stages=1)


def test_a_killed_driver_is_resumed_without_redoing_or_duplicating_anything(tmp_path):
    stages = "[{domain: upper, steps: 30}, {domain: caesar, steps: 30}]"
    pipeline = write_pipeline(tmp_path, stages, "{fft: {kind: fft}, hft: {kind: hft}}")
    uninterrupted = tmp_path / "uninterrupted"
    with open(tmp_path / "uninterrupted.log", "w") as out:  # trains while the killed run runs
        reference = subprocess.Popen([sys.executable, "-c", UNINTERRUPTED, str(pipeline), str(uninterrupted)],
                                     stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    driver = start(pipeline, tmp_path)
    parent_id, seen, log = None, {}, []
    try:
        for line in driver.stderr:
            log.append(line)
            if parent_id is None and (m := re.search(r"MLflow parent run ([0-9a-f]{32})", line)):
                parent_id = m.group(1)
            if m := re.search(r"\[hft-ray\] (fft|hft) (after stage 1|stage 2/2 done):", line):
                seen.setdefault(m.group(2), m.group(1))
            # Once a stage 1 is evaluated and a stage 2 trained (whose evaluation is yet to come):
            if len(seen) == 2:
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
    before = stage_runs(client, parent_id)
    evaluated = {key for key, c in before.items() if "eval/upper" in c.data.metrics}
    assert evaluated, "at least one stage was finished and evaluated before the kill"
    folder, manifest = read_manifest(client, parent_id)
    recorded = {(method, index): entry for method, branch in manifest["branches"].items()
                for index, entry in branch["stages"].items()}
    assert (manifest["parent_run_id"], manifest["attempt"]) == (parent_id, 0)
    assert {key for key, entry in recorded.items() if entry.get("row")} <= evaluated
    # The manifest is written before the line that says so.
    assert recorded[seen["after stage 1"], "1"].get("row") and recorded[seen["stage 2/2 done"], "2"].get("checkpoint")
    for key, entry in recorded.items():  # what the dead driver recorded is so
        assert "run_id" not in entry or entry["run_id"] == before[key].info.run_id, key
        assert "checkpoint" not in entry or is_whole(entry["checkpoint"]), key
    # A branch's next stage trains while its last one is evaluated: more may have been written than recorded.
    written = {(m, i) for m in ("fft", "hft") for i in DOMAINS if is_whole(folder / m / f"stage-{i}")}
    assert (seen["stage 2/2 done"], "2") in written

    resumed = subprocess.run([*HFT_RAY, "run", str(pipeline), "--resume", "--tracking-uri",
                              f"sqlite:///{tmp_path}/mlflow.db", "--json"],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout)
    assert result["parent_run_id"] == parent_id
    for method, index in {key for key, entry in recorded.items() if entry.get("checkpoint")}:
        done = re.search(rf"\[hft-ray\] {method}: stages 1-(\d) done in an earlier attempt", resumed.stderr)
        assert done and int(done.group(1)) >= int(index), resumed.stderr[-3000:]
    for method, index in (("fft", "1"), ("fft", "2"), ("hft", "1"), ("hft", "2")):
        trained = f"[hft-ray] {method} stage {index}/2 ({DOMAINS[index]}): training" in resumed.stderr
        assert trained == ((method, index) not in written), \
            f"{method} stage {index}: trained again if and only if its checkpoint was not written\n{resumed.stderr}"
    after = stage_runs(client, parent_id)
    assert sorted(after) == [("fft", "1"), ("fft", "2"), ("hft", "1"), ("hft", "2")], "no duplicated child run"
    assert reference.wait(timeout=600) == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    for (method, index), run in after.items():
        # Every step once, each loss that of the uninterrupted run; its weights too.
        expected = json.loads((uninterrupted / method / f"stage-{index}" / "train_log.json").read_text())["losses"]
        assert len(expected) == 30 and losses(client, run) == list(enumerate(expected, start=1)), (method, index)
        assert same_weights(folder / method / f"stage-{index}", uninterrupted / method / f"stage-{index}")
        assert run.info.status == "FINISHED", (method, index, resumed.stderr[-3000:])
        if (method, index) in before:
            assert run.info.run_id == before[method, index].info.run_id, "child runs are reused"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["hft.attempt"] == "1"
    for method in ("fft", "hft"):
        assert len(result["methods"][method]["matrix"]["scores"]) == 3
    check_manifest(client, result, attempt=1, stages=2)

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
