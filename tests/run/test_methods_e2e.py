"""Every method and stage kind end to end on real Ray and MLflow: SFT, SFT with replay, and a
DPO stage, under HFT+replay with periodic re-selection, under importance-aware HFT and under LoRA."""

import json
from pathlib import Path

import pytest

PIPELINE = """\
name: methods
model: {source: builtin:tiny-llama}
domains:
  upper: {source: builtin:upper, eval_size: 16}
  caesar: {source: builtin:caesar, eval_size: 16}
  prefer: {source: builtin:prefer, eval_size: 16}
stages:
  - {domain: upper, steps: 6}
  - {domain: caesar, steps: 6}
  - {domain: prefer, kind: dpo, steps: 6, beta: 0.5}
train: {lr: 2.0e-3, batch_size: 16, max_length: 32, log_every: 3, cpus_per_worker: 0.5}
methods:
  hft_replay: {kind: hft, ratio: 0.5, replay: 0.25, reselect_every: 3}
  lora: {kind: lora, r: 4, alpha: 8}
  hft_importance: {kind: hft, granularity: category, strategy: importance, importance_batches: 2}
eval: {metric: token_accuracy, max_new_tokens: 8, max_examples: 16}
"""


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory, run_pipeline):
    folder = tmp_path_factory.mktemp("methods")
    return (folder, *run_pipeline(folder, PIPELINE))


def test_hft_with_replay_importance_and_lora_run_sft_and_dpo_stages(methods_run):
    tmp_path, out, client, runs, stderr = methods_run
    stages = {(r.data.tags["hft.method"], int(r.data.tags["hft.stage"])): r for r in runs}
    assert len(stages) == 9 and all(r.info.status == "FINISHED" for r in runs)
    assert stages[("hft_replay", 2)].data.params["replay"] == "0.25", "replay on a later SFT stage"
    assert stages[("hft_replay", 1)].data.params["reselect_every"] == "3"
    assert "replay" not in stages[("hft_replay", 1)].data.params, "nothing to replay before stage 2"
    assert "replay" not in stages[("hft_replay", 3)].data.params, "not into DPO pairs"
    for method in ("hft_replay", "lora", "hft_importance"):
        dpo = stages[(method, 3)]
        assert [m.step for m in client.get_metric_history(dpo.info.run_id, "train/loss")] == list(range(1, 7))
        assert "eval_all/prefer/reward_accuracy" in dpo.data.metrics
        matrix = out["methods"][method]["matrix"]
        assert len(matrix["scores"]) == 4 and all(len(row) == 3 for row in matrix["scores"])
    selection = json.loads(Path(client.download_artifacts(stages[("lora", 1)].info.run_id, "selection.json",
                                                          str(tmp_path))).read_text())
    assert selection["kind"] == "lora" and selection["r"] == 4
    assert "% of parameters trained" in stderr


def _artifact(client, run, name, folder):
    return json.loads(Path(client.download_artifacts(run.info.run_id, name, str(folder))).read_text())


def test_importance_plans_are_measured_on_the_model_that_starts_each_stage(methods_run):
    """Stage 1 has nothing earlier to protect (a random draw); stage 2's scores are those of stage
    1's checkpoint on `upper`'s data, recomputed here, and its plan follows from them."""
    from hft_ray.core.importance import measure
    from hft_ray.core.selection import model_units, plan_units
    from hft_ray.train.checkpoints import load_checkpoint
    from hft_ray.train.models import meta_model

    tmp_path, out, client, runs, stderr = methods_run
    stages = {int(r.data.tags["hft.stage"]): r for r in runs if r.data.tags["hft.method"] == "hft_importance"}
    assert stages[1].data.params["strategy"] == "random" and stages[2].data.params["strategy"] == "importance"
    assert "nothing learnt earlier to protect" in stderr and "most important to earlier domains" in stderr
    manifest = json.loads((Path(out["output_dir"]) / "manifest.json").read_text())["branches"]["hft_importance"]
    plan = _artifact(client, stages[2], "selection.json", tmp_path / "s2")
    assert plan["importance"] == manifest["stages"]["2"]["importance"]

    from hft_ray.data.loading import load_domain
    upper = load_domain("upper", "builtin:upper", eval_size=16).train
    units = model_units(meta_model("builtin:tiny-llama"))
    model, tokenizer = load_checkpoint(manifest["stages"]["1"]["checkpoint"])
    # The job carries the rows the measure reads: importance_batches x batch_size of each earlier domain.
    again = measure(model, tokenizer, units, [upper[:2 * 16]], batches=2, batch_size=16, max_length=32, seed=2)
    assert again.keys() == plan["importance"].keys()
    for key, value in again.items():
        assert plan["importance"][key] == pytest.approx(value, rel=1e-3), key
    expected = plan_units(units, "llama", "category", 0.5, seed=0, stage=2, scores=plan["importance"])
    assert sorted(expected.trained) == plan["trained"]
    assert _artifact(client, stages[3], "selection.json", tmp_path / "s3")["importance"] != plan["importance"]
