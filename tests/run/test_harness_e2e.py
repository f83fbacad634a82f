"""An lm-evaluation-harness column through `hft-ray run` on real Ray, MLflow and lm-eval: a local
multiple-choice task (tests/data/harness) scored on the base and after every stage, in the
forgetting matrix, in each stage's child run as `eval/<column>`, with the harness's whole
result beside it; a task name that does not exist exits 2 before anything starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the harness extra: pip install 'hft-ray[harness]'")

TASKS = Path(__file__).parents[1] / "data" / "harness"
PIPELINE = f"""\
name: harness-column
model: {{source: builtin:tiny-llama}}
domains:
  upper: {{source: builtin:upper, eval_size: 16}}
  caesar: {{source: builtin:caesar, eval_size: 16}}
  upper_mc: {{source: {{harness: upper_mc, include_path: {TASKS}, limit: 40}}}}
stages: [{{domain: upper, steps: 60}}, {{domain: caesar, steps: 30}}]
train: {{lr: 3.0e-3, batch_size: 32, max_length: 32, log_every: 30, checkpoint_every: 0}}
methods: {{hft: {{kind: hft}}}}
eval: {{metric: token_accuracy, max_new_tokens: 8, max_examples: 16}}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory, run_pipeline):
    folder = tmp_path_factory.mktemp("harness")
    return folder, *run_pipeline(folder, PIPELINE)


def read(client, run_id: str, path: str, folder: Path):
    return json.loads(Path(client.download_artifacts(run_id, path, str(folder))).read_text())


def test_the_column_is_in_the_matrix_and_in_every_stage_run(finished):
    folder, out, client, children, _ = finished
    matrix = out["methods"]["hft"]["matrix"]
    column = matrix["columns"].index("upper_mc")
    scores = [row[column] for row in matrix["scores"]]
    assert matrix["rows"] == ["base", "1:upper", "2:caesar"] and len(scores) == 3
    base = read(client, out["parent_run_id"], "harness/base/upper_mc.json", folder)
    assert base["results"]["upper_mc"]["acc,none"] == scores[0] and base["n-samples"]["upper_mc"]["effective"] == 40
    for child in children:
        stage = int(child.data.tags["hft.stage"])
        report = read(client, child.info.run_id, "harness/upper_mc.json", folder)
        assert child.data.metrics["eval/upper_mc"] == report["results"]["upper_mc"]["acc,none"] == scores[stage]
        assert child.data.metrics["eval_all/upper_mc/acc"] == scores[stage]
    # Training on `upper` teaches the task's answer (the word upper-cased) beyond the base's guess.
    assert scores[1] > scores[0] + 0.2, scores


def test_a_task_that_does_not_exist_exits_2_naming_it(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINE.replace("harness: upper_mc,", "harness: upper_mcq,"))
    result = subprocess.run([sys.executable, "-m", "hft_ray", "run", "p.yaml", "--tracking-uri",
                             f"sqlite:///{tmp_path}/m.db"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "domains.upper_mc.source.harness: 'upper_mcq' is not an lm-evaluation-harness task; did you mean " \
           "'upper_mc'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m.db").exists()
