"""Every method and stage kind end to end on real Ray and MLflow: SFT, SFT with replay, and a
DPO stage, under HFT+replay with periodic re-selection and under LoRA."""

import json
from pathlib import Path

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
eval: {metric: token_accuracy, max_new_tokens: 8, max_examples: 16}
"""


def test_hft_with_replay_and_lora_run_sft_and_dpo_stages(tmp_path, run_pipeline):
    out, client, runs, stderr = run_pipeline(tmp_path, PIPELINE)
    stages = {(r.data.tags["hft.method"], int(r.data.tags["hft.stage"])): r for r in runs}
    assert len(stages) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert stages[("hft_replay", 2)].data.params["replay"] == "0.25", "replay on a later SFT stage"
    assert stages[("hft_replay", 1)].data.params["reselect_every"] == "3"
    assert "replay" not in stages[("hft_replay", 1)].data.params, "nothing to replay before stage 2"
    assert "replay" not in stages[("hft_replay", 3)].data.params, "not into DPO pairs"
    for method in ("hft_replay", "lora"):
        dpo = stages[(method, 3)]
        assert [m.step for m in client.get_metric_history(dpo.info.run_id, "train/loss")] == list(range(1, 7))
        assert "eval_all/prefer/reward_accuracy" in dpo.data.metrics
        matrix = out["methods"][method]["matrix"]
        assert len(matrix["scores"]) == 4 and all(len(row) == 3 for row in matrix["scores"])
    selection = json.loads(Path(client.download_artifacts(stages[("lora", 1)].info.run_id, "selection.json",
                                                          str(tmp_path))).read_text())
    assert selection["kind"] == "lora" and selection["r"] == 4
    assert "% of parameters trained" in stderr
