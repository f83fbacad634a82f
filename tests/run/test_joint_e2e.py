"""The joint (multi-task) reference through the real runner: every stage trains on all the
stages' data, so after stage 1 it already knows something of stage 2's domain, which the
sequential branch has not seen."""

import json

PIPELINE = """\
name: joint
seed: 0
model: {source: builtin:tiny-llama}
domains:
  upper: {source: builtin:upper, eval_size: 32}
  caesar: {source: builtin:caesar, eval_size: 32}
stages: [{domain: upper, steps: 100}, {domain: caesar, steps: 100}]
train: {lr: 3.0e-3, batch_size: 16, max_length: 32, log_every: 50}
methods: {fft: {kind: fft}, mtl: {kind: joint}}
eval: {metric: token_accuracy, max_new_tokens: 8, max_examples: 32}
"""


def test_joint_trains_all_stages_data_in_every_stage_and_is_drawn_as_the_reference(tmp_path, run_pipeline):
    out, client, children, _ = run_pipeline(tmp_path, PIPELINE)
    stages = {(c.data.tags["hft.method"], c.data.tags["hft.stage"]): c for c in children}
    assert sorted(stages) == [("fft", "1"), ("fft", "2"), ("mtl", "1"), ("mtl", "2")]
    selection = json.loads(open(client.download_artifacts(stages["mtl", "1"].info.run_id, "selection.json",
                                                          str(tmp_path))).read())
    assert selection["kind"] == "joint" and selection["trained"] == "all"
    joint, fft = (out["methods"][m]["matrix"] for m in ("mtl", "fft"))
    caesar = joint["columns"].index("caesar")
    assert joint["rows"] == fft["rows"] == ["base", "1:upper", "2:caesar"]
    # After stage 1 (upper), the sequential branch has never seen caesar; joint has trained on it.
    assert joint["scores"][1][caesar] > fft["scores"][1][caesar] + 0.1, (joint, fft)
    artifacts = {a.path for a in client.list_artifacts(out["parent_run_id"], "forgetting")}
    assert {"forgetting/mtl.json", "forgetting/comparison.png"} <= artifacts
