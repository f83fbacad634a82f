"""`hft-ray tune`: every shipped space file loads; bad ones exit 2 before Ray starts; the smoke
search end to end on real Ray Tune, Ray Train and MLflow (sqlite), read back with MlflowClient;
ASHA stopping a trial that cannot learn; a search resumed after its driver was killed."""

import csv
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from hft_ray.cli import main
from hft_ray.config.preflight import prepare
from hft_ray.config.space import Objective, load_space, objective_value
from hft_ray.config.spec import load_spec
from hft_ray.core.metrics import ForgettingMatrix, summary

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).parents[2]
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_every_shipped_space_validates_with_its_pipeline(path):
    loaded = load_space(path)
    prepared = prepare(loaded.spec, loaded.pipeline_path.parent)
    assert all(prepared.domains[s.domain].train for s in loaded.spec.stages)


def test_the_demo_searches_at_least_8_trials():
    space = load_space(ROOT / "tune_spaces" / "selection.yaml").space
    grid = len(space.space.granularity) * len(space.space.ratio)
    assert grid * space.num_samples >= 8


def test_objective_combines_op_and_bwt_and_counts_undefined_bwt_as_zero():
    combo = Objective(metric="OP+BWT", bwt_weight=0.5)
    assert objective_value(combo, {"OP": 0.6, "BWT": -0.2}) == pytest.approx(0.5)
    assert objective_value(combo, {"OP": 0.6}) == pytest.approx(0.6)  # after stage 1
    assert Objective(metric="forgetting").direction == "min" and Objective().direction == "max"


GOOD = {"pipeline": str(ROOT / "pipelines" / "smoke.yaml"),
        "space": {"granularity": ["category"], "ratio": [0.5]}}

CASES = [
    ("not a mapping", "- a", ["expected a mapping"]),
    ("unknown top key", {"trials": 3}, ["trials: unknown key", "valid keys"]),
    ("unknown space key", {"space": {"rank": [1]}}, ["space.rank: unknown key"]),
    ("unknown granularity", {"space": {"granularity": ["rows"]}},
     ["space.granularity", "'rows'", "'category', 'layer', 'model' or 'element'"]),
    ("ratio outside (0,1)", {"space": {"ratio": [0.5, 1.5]}}, ["space.ratio", "less than 1", "1.5"]),
    ("sampler not for the key", {"space": {"seed": {"uniform": [1, 2]}}},
     ["space.seed.uniform: not for seed", "choice"]),
    ("two samplers", {"space": {"ratio": {"choice": [0.5], "uniform": [0.1, 0.2]}}},
     ["space.ratio: give exactly one of"]),
    ("bad choice", {"space": {"granularity": {"choice": ["rows"]}}},
     ["space.granularity.choice: ['rows'] not valid", "layer"]),
    ("bad uniform", {"space": {"ratio": {"uniform": [0.8, 0.2]}}}, ["space.ratio.uniform: [0.8, 0.2]", "low < high"]),
    ("bad strategy", {"space": {"strategy": ["fisher"]}}, ["space.strategy", "'random' or 'importance'"]),
    ("importance beside element",
     {"space": {"strategy": ["random", "importance"], "granularity": ["layer", "element"]}},
     ["space.strategy: 'importance' ranks whole matrices and cannot pair with granularity element"]),
    ("importance beside re-selection", {"space": {"strategy": {"choice": ["importance"]}, "reselect_every": [0, 5]}},
     ["space.strategy: 'importance' draws one plan per stage and cannot pair with reselect_every > 0"]),
    ("unknown objective", {"objective": {"metric": "accuracy"}},
     ["objective.metric", "'accuracy'", "'OP', 'BWT', 'forgetting', 'heldout_delta' or 'OP+BWT'"]),
    ("unknown scheduler", {"scheduler": "hyperband"}, ["scheduler.kind: 'hyperband'", "fifo or asha"]),
    ("zero grace period", {"scheduler": {"kind": "asha", "grace_period": 0}},
     ["scheduler.grace_period", "greater than 0"]),
    ("missing pipeline", {"pipeline": "nope.yaml"}, ["pipeline: 'nope.yaml' does not exist"]),
    ("set names nothing", {"set": {"stages.7.steps": 3}}, ["set.stages.7.steps: 3 does not name an entry"]),
    ("set breaks the pipeline", {"set": {"train.lr": -1}}, ["smoke.yaml (after set): train.lr", "greater than 0"]),
    ("zero seeds", {"space": {"seeds": 0}}, ["space.seeds", "greater than 0"]),
    ("seeds beside a searched seed", {"space": {"seeds": 2, "seed": [0, 1]}},
     ["space.seeds: every trial runs these seeds; drop space.seed"]),
    ("seeds in both files", {"space": {"seeds": [0, 1]}, "set": {"seeds": [3, 4]}},
     ["space.seeds: every trial runs these seeds; drop the pipeline's seeds: key"]),
]


@pytest.mark.parametrize("case, content, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_space_exits_2_naming_the_problem(case, content, expected, tmp_path, capsys, monkeypatch):
    import ray

    path = tmp_path / "space.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump({**GOOD, **content}))
    monkeypatch.setattr("hft_ray.run.cluster.init_ray", lambda *args: pytest.fail("Ray started on bad input"))
    assert main(["tune", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{case}: {text!r} not in {err}"
    assert not ray.is_initialized() and not (tmp_path / "m.db").exists()


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    """The smoke search (4 trials x 2 stages, ASHA) through the console script."""
    folder = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{folder}/mlflow.db"
    started = time.perf_counter()
    result = subprocess.run(
        ["hft-ray", "tune", str(ROOT / "tune_spaces" / "smoke.yaml"), "--tracking-uri", uri, "--json",
         "--set", f"set.output.dir={folder}/runs"],
        capture_output=True, text=True, timeout=1200, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"smoke search: {time.perf_counter() - started:.0f}s")
    return json.loads(result.stdout), MlflowClient(uri), result.stderr


def test_a_finished_trial_keeps_its_last_stage_checkpoint_only(finished_search):
    out, client, _ = finished_search
    parent = client.get_run(out["parent_run_id"])
    folder = Path(parent.data.tags["hft.output_dir"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    finished = [c.data.tags["hft.trial_id"] for c in children if c.info.status == "FINISHED"]
    assert finished
    for trial in finished:
        assert (folder / trial / "best" / "stage-2" / "model.safetensors").is_file()
        assert not (folder / trial / "best" / "stage-1").exists(), "output.keep: last, a trial's default"


def test_search_logs_parent_and_one_child_run_per_trial(finished_search):
    out, client, stderr = finished_search
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["hft.kind"] == "tune"
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    for child in children:
        assert child.data.tags["hft.kind"] == "trial"
        assert child.data.params["granularity"] == "category" and child.data.params["ratio"] in ("0.25", "0.75")
        stopped = child.data.tags["hft.stopped_early"] == "true"
        assert child.info.status == ("KILLED" if stopped else "FINISHED")
        assert "objective" in child.data.metrics and "eval/upper" in child.data.metrics
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "objective")]
        assert steps == ([1] if stopped else [1, 2])  # one report per stage
        matrix = json.loads(Path(client.download_artifacts(child.info.run_id, "forgetting/trial.json")).read_text())
        assert len(matrix["scores"]) == len(steps) + 1
    assert {c.data.params["strategy"] for c in children} == {"random", "importance"}
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert "stage 2/2" in stderr


def test_results_table_best_config_and_best_pipeline(finished_search):
    out, client, _ = finished_search
    run_id = out["parent_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"results.csv", "objective_vs_ratio.png", "best_config.json", "best_pipeline.yaml"} <= artifacts
    table = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(run_id, "results.csv")).read_text())))
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert len(table) == len(children) == len(out["trials"])
    assert {r["run_id"] for r in table} == {c.info.run_id for c in children}
    best = json.loads(Path(client.download_artifacts(run_id, "best_config.json")).read_text())
    finished = [r for r in table if r["status"] == "finished"]
    assert best["objective"] == pytest.approx(max(float(r["objective"]) for r in finished))
    assert client.get_run(run_id).data.params["best.ratio"] == str(best["config"]["ratio"])
    spec, _ = load_spec(out["best_pipeline"])
    assert set(spec.methods) == {"fft", "best"}
    assert spec.methods["best"].ratio == best["config"]["ratio"]
    assert [s.steps for s in spec.stages] == [10, 10]  # the search's `set:` carried over


def test_the_best_trials_pipeline_file_trains_the_same_matrix_with_hft_ray_run(finished_search, run_pipeline,
                                                                             tmp_path):
    """One code path builds a trial's branch and a pipeline's (hft_ray/run/planner.py): the same
    pipeline and seed give the same plan, the same loss at every step and the same matrix, in
    another driver process (its own hash seed) on the same machine."""
    out, client, _ = finished_search
    best = out["best"]
    assert set(best["matrix"]) == {"columns", "rows", "stage_domains", "scores"}
    again, _, _, _ = run_pipeline(tmp_path, Path(out["best_pipeline"]).read_text())
    assert again["methods"]["best"]["matrix"] == best["matrix"]
    trial = Path(client.get_run(out["parent_run_id"]).data.tags["hft.output_dir"]) / best["trial_id"] / "best"
    run = Path(again["output_dir"]) / "best"
    for name in ("plan.json", "train_log.json"):  # stage 2's (a trial keeps its last stage)
        trial_side, run_side = (json.loads((f / "stage-2" / name).read_text()) for f in (trial, run))
        if name == "train_log.json":
            trial_side, run_side = trial_side["losses"], run_side["losses"]
            assert len(run_side) == 10 and run_side[-1] < run_side[0], "it trained"
        assert trial_side == run_side, name


def _search(tmp_path: Path, space: dict) -> tuple[list[str], str]:
    """A space on the smoke pipeline (stages' steps set by the caller), written to tmp_path, and
    the `hft-ray tune --json` command line and tracking URI for it."""
    import sys

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"pipeline": str(ROOT / "pipelines" / "smoke.yaml"), **space}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return [sys.executable, "-m", "hft_ray", "tune", str(path), "--tracking-uri", uri, "--json"], uri


def test_asha_stops_the_trial_that_cannot_learn_on_its_mean_over_seeds(tmp_path):
    """Two trials one at a time, the pipeline's lr then 1e-7, each over 2 seeds (`space.seeds`:
    a branch per seed, from a base pretrained per seed before the trials). Stage 1 (150 steps,
    enough for lr 2e-3 to start on `upper`) leaves the 1e-7 trial at the base models' score: ASHA
    (grace period 1, reduction factor 2) stops it after stage 1 on its mean, below the median."""
    command, uri = _search(tmp_path, {
        "set": {"stages.0.steps": 150, "stages.1.steps": 10, "eval.metric": "token_accuracy",
                "output.dir": str(tmp_path / "runs"), "train.cpus_per_worker": 0.9},
        "space": {"lr": [2.0e-3, 1.0e-7], "seeds": 2}, "objective": {"metric": "OP"}, "max_concurrent": 1,
        "scheduler": {"kind": "asha", "grace_period": 1}})
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    print(f"asha search: {time.perf_counter() - started:.0f}s")
    assert result.returncode == 0, result.stderr[-3000:]
    out, client = json.loads(result.stdout), MlflowClient(uri)
    parent = client.get_run(out["parent_run_id"])
    runs = {float(r.data.params["lr"]): r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert set(runs) == {2e-3, 1e-7}
    good, bad = runs[2e-3], runs[1e-7]
    stage1 = {lr: client.get_metric_history(r.info.run_id, "objective")[0] for lr, r in runs.items()}
    assert stage1[1e-7].step == stage1[2e-3].step == 1
    assert stage1[1e-7].value < stage1[2e-3].value, "the space must make one trial clearly worse"
    assert bad.info.status == "KILLED" and bad.data.tags["hft.stopped_early"] == "true"
    assert [m.step for m in client.get_metric_history(bad.info.run_id, "objective")] == [1]
    assert good.info.status == "FINISHED" and good.data.tags["hft.stopped_early"] == "false"
    assert [m.step for m in client.get_metric_history(good.info.run_id, "objective")] == [1, 2]
    assert f"trial {bad.data.tags['hft.trial_id']} stopped early after stage 1 (scheduler)" in result.stderr
    rows = {float(r["lr"]): r for r in out["trials"]}
    assert rows[1e-7]["status"] == "stopped_early" and rows[1e-7]["stages_done"] == 1
    assert rows[2e-3]["status"] == "finished" and out["best"]["run_id"] == good.info.run_id
    # Over seeds: each report is the mean of the trial's 2 branches, with each metric's deviation.
    folder = Path(parent.data.tags["hft.output_dir"])
    assert all((folder / f"seed-{s}" / "base" / "model.safetensors").is_file() for s in (0, 1))
    assert (folder / good.data.tags["hft.trial_id"] / "seed-1" / "best" / "stage-2").is_dir()
    for lr, run in runs.items():
        assert run.data.metrics["seeds"] == 2 and run.data.metrics["objective.std"] >= 0, lr
        matrix = json.loads(Path(client.download_artifacts(run.info.run_id, "forgetting/trial.json")).read_text())
        mean_op = summary(ForgettingMatrix.from_dict(matrix))["OP"]  # OP is linear: the mean matrix's is the mean
        assert run.data.metrics["OP"] == pytest.approx(mean_op), lr
    table = list(csv.DictReader(io.StringIO((folder / "results.csv").read_text())))
    assert {"seeds", "objective.std", "OP.std", "BWT.std"} <= set(table[0])
    assert all(float(r["objective.std"]) >= 0 for r in table)
    best = json.loads(Path(client.download_artifacts(parent.info.run_id, "best_config.json")).read_text())
    assert best["seeds"] == [0, 1] and best["objective_std"] == pytest.approx(float(rows[2e-3]["objective.std"]))
    assert load_spec(out["best_pipeline"])[0].seeds == [0, 1], "the best pipeline runs the same seeds"


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _mlflow_record(client: MlflowClient, run_id: str) -> dict:
    """All a trial's child run holds: status and times, params, tags, every metric's full history
    (value, step, timestamp) and its artifacts."""
    run = client.get_run(run_id)

    def artifacts(path=None):
        return [x for a in client.list_artifacts(run_id, path) for x in (artifacts(a.path) if a.is_dir else [a.path])]

    return {"status": run.info.status, "start": run.info.start_time, "end": run.info.end_time,
            "params": run.data.params, "tags": run.data.tags, "artifacts": artifacts(),
            "metrics": {k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k)]
                        for k in run.data.metrics}}


def _restorable_stage(tune_dir: Path, trial_id: str) -> int:
    """The stage a `Tuner.restore` of the search saved under `tune_dir` would resume the trial
    after (Tune's saved state holds that report and its checkpoint); 0 if none (yet)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(tune_dir)).trials
    except Exception:  # no state saved yet, or one half written
        return 0
    trial = next((t for t in trials if t.trial_id == trial_id), None)
    return int(trial.last_result.get("stage", 0)) if trial is not None and trial.checkpoint else 0


def test_a_search_whose_driver_died_is_resumed_without_duplicate_runs(tmp_path):
    """Two trials one at a time. The second reports stage 1 (the first has FINISHED); once Tune's
    saved search state holds that report's checkpoint, the driver and the Ray it embeds are killed.
    `hft-ray tune --resume` leaves the first trial alone (not started, nothing trained, written or
    logged for it) and restores the second, which goes on after stage 1: its one report since the
    restore is stage 2, and its stage-1 checkpoint is not written again."""
    import re
    import signal

    command, uri = _search(tmp_path, {
        # stage 2 longer: the second trial is still at it when the kill comes
        "set": {"stages.0.steps": 30, "stages.1.steps": 100, "eval.metric": "token_accuracy",
                "output.dir": str(tmp_path / "runs"), "output.keep": "all"},  # stage 1's files are checked
        "space": {"ratio": [0.25, 0.75]}, "objective": {"metric": "OP"}, "max_concurrent": 1})
    started = time.perf_counter()
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              start_new_session=True)
    log, done, running, saved = [], None, None, 0
    try:
        for line in driver.stderr:
            log.append(line)
            report = re.search(r"trial (\S+) stage ([12])/2: objective", line)
            if report and report[2] == "2":
                done = report[1]
            elif report and done and report[1] != done:
                running = report[1]
                break
        # Tune saves its state a moment after a report (the checkpoint registered, then synced); a
        # driver killed in between leaves no checkpoint to restore the trial from (it would start
        # again, finding its trained stages on disk): wait for it.
        tune_dir = next((tmp_path / "runs").glob("*/tune"), None)
        deadline = time.monotonic() + 120
        while running and tune_dir and not saved and time.monotonic() < deadline:
            saved = _restorable_stage(tune_dir, running)
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it embeds
        killed = time.time()
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == -signal.SIGKILL and running, "".join(log)[-3000:]
    assert saved == 1, f"Tune's saved state has the second trial at stage {saved}, not 1"
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], "tags.`hft.kind` = 'tune'")
    assert parent.info.status == "RUNNING"
    folder = Path(parent.data.tags["hft.output_dir"])
    assert tune_dir == folder / "tune"
    runs = {r.data.tags["hft.trial_id"]: r.info.run_id for r in client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert set(runs) == {done, running}
    before = _mlflow_record(client, runs[done])
    assert before["status"] == "FINISHED"
    done_files = _files(folder / done)
    assert {"best/stage-1", "best/stage-2"} <= {str(Path(f).parent) for f in done_files}
    (done_tune,) = tune_dir.glob(f"*{done}*")
    done_tune_files = _files(done_tune)
    stage1 = _files(folder / running / "best" / "stage-1")
    assert stage1, "the running trial's stage-1 checkpoint is there before the kill"
    running_before = _mlflow_record(client, runs[running])
    trainings = {t: sorted(p.name for p in (folder / "ray").glob(f"{t}-*")) for t in runs}  # Ray Train runs
    assert len(trainings[done]) == len(trainings[running]) == 1

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    print(f"resume test: {time.perf_counter() - started:.0f}s")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads(resumed.stdout)
    assert out["parent_run_id"] == parent.info.run_id
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["hft.attempt"] == "1"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and len(out["trials"]) == 2, "no trial run twice"
    # The finished trial: not started again, nothing trained, written or logged for it.
    assert f"trial {done} started" not in resumed.stderr
    assert _mlflow_record(client, runs[done]) == before
    assert _files(folder / done) == done_files
    assert _files(done_tune) == done_tune_files
    assert sorted(p.name for p in (folder / "ray").glob(f"{done}-*")) == trainings[done]
    # The running trial: restored after stage 1, which is neither trained, evaluated nor logged again.
    assert _files(folder / running / "best" / "stage-1") == stage1, "stage 1 was trained again"
    assert (folder / running / "best" / "stage-2").is_dir()
    (running_tune,) = tune_dir.glob(f"*{running}*")
    results = [json.loads(line) for line in (running_tune / "result.json").read_text().splitlines()]
    since = [(r["stage"], r["training_iteration"], r["iterations_since_restore"])
             for r in results if r["timestamp"] > killed]
    assert since == [(2, 2, 1)], f"reports since the resume (stage, iteration, since restore): {since}"
    after = _mlflow_record(client, runs[running])
    assert after["status"] == "FINISHED"
    for key, history in running_before["metrics"].items():
        assert after["metrics"][key][: len(history)] == history, key
    assert [m[0] for m in after["metrics"]["objective"]] == [1, 2]
    assert out["best"] is not None
