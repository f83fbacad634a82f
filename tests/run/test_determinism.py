"""The same pipeline and seed give the same plans, losses and matrices (one worker, CPU):
two real `hft-ray run`s, compared through MLflow."""

import json

PIPELINE = """\
name: determinism
seed: 7
model: {source: builtin:tiny-llama}
domains:
  upper: {source: builtin:upper, eval_size: 16}
  caesar: {source: builtin:caesar, eval_size: 16}
stages: [{domain: upper, steps: 12}]
train: {lr: 2.0e-3, batch_size: 16, max_length: 32, log_every: 6}
methods: {hft: {kind: hft, granularity: layer, ratio: 0.5}}
eval: {metric: token_accuracy, max_new_tokens: 8, max_examples: 16}
"""


def run_once(run_pipeline, folder):
    _, client, (stage,), _ = run_pipeline(folder, PIPELINE)
    plan = json.loads(open(client.download_artifacts(stage.info.run_id, "selection.json", str(folder))).read())
    losses = [m.value for m in client.get_metric_history(stage.info.run_id, "train/loss")]
    matrix = json.loads(open(client.download_artifacts(stage.data.tags["mlflow.parentRunId"], "forgetting/hft.json",
                                                       str(folder))).read())
    return matrix, plan["trained"], losses


def test_same_pipeline_and_seed_give_the_same_plan_losses_and_matrix(tmp_path, run_pipeline):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = run_once(run_pipeline, tmp_path / "a"), run_once(run_pipeline, tmp_path / "b")
    assert first[1] == second[1], "the same selection plan"
    assert len(first[2]) == 12 and first[2] == second[2], "the same loss at every step"
    assert first[0] == second[0], "the same forgetting matrix"
    assert first[2][-1] < first[2][0] * 0.8, "and it did train (equal because nothing happened would prove nothing)"
