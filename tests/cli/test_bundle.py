"""A job's bundle: the pipeline with overrides applied and the local files it names, carried."""

import json
from pathlib import Path

import pytest
import yaml

from hft_ray.cli.submit import prepare_submission
from hft_ray.config.preflight import prepare
from hft_ray.config.space import load_space
from hft_ray.config.spec import load_spec
from hft_ray.errors import UserError

ROOT = Path(__file__).parents[2]


@pytest.fixture
def project(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [{"prompt": f"Q{i}:", "completion": f" {i}"} for i in range(40)]
    (tmp_path / "data" / "nums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.yaml").write_text("""\
name: carry
model: {source: builtin:tiny-llama}
domains:
  nums: {source: {path: data/nums.jsonl}, eval_size: 8}
  upper: {source: builtin:upper, eval_size: 8}
stages: [{domain: nums, steps: 3}]
methods: {hft: {kind: hft}}
output: {dir: out}
""")
    return tmp_path


def test_a_run_bundle_carries_local_data_and_validates_as_the_job_will(project, tmp_path_factory, monkeypatch):
    bundle = tmp_path_factory.mktemp("bundle")
    monkeypatch.chdir(project)
    (project / "data" / "chat.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                 "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    submission = prepare_submission("run", "p.yaml", ["stages.0.steps=7", "model.chat_template=data/chat.jinja"],
                                    "sqlite:///mlflow.db", None, [], bundle)
    written = yaml.safe_load((bundle / "pipeline.yaml").read_text())
    assert written["stages"][0]["steps"] == 7, "overrides are applied in the bundle"
    assert written["domains"]["nums"]["source"]["path"] == "carried/nums-nums.jsonl"
    assert (bundle / "carried" / "nums-nums.jsonl").read_bytes() == (project / "data" / "nums.jsonl").read_bytes()
    assert written["domains"]["upper"]["source"] == "builtin:upper"
    assert written["output"]["dir"] == str(project / "out"), "a relative output.dir is made absolute"
    assert written["model"]["chat_template"] == "carried/template-chat.jinja"
    assert (bundle / "carried" / "template-chat.jinja").read_bytes() == (project / "data" / "chat.jinja").read_bytes()
    assert submission.carried == ["data/chat.jinja", "data/nums.jsonl"]
    assert submission.entrypoint == f"python -m hft_ray run pipeline.yaml --tracking-uri sqlite:///{project}/mlflow.db"
    # The bundle alone is a valid pipeline: what the job checks on the cluster.
    spec, _ = load_spec(bundle / "pipeline.yaml")
    assert len(prepare(spec, bundle).domains["nums"].train) > 0


def test_a_space_bundle_names_its_pipeline_inside_the_bundle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    submission = prepare_submission("tune", str(ROOT / "tune_spaces" / "smoke.yaml"), [], "http://127.0.0.1:5000",
                                    str(tmp_path / "shared"), ["--num-samples", "2"], tmp_path / "b")
    assert submission.entrypoint == ("python -m hft_ray tune space.yaml --tracking-uri http://127.0.0.1:5000 "
                                     "--num-samples 2")
    loaded = load_space(tmp_path / "b" / "space.yaml")
    assert loaded.spec.output.dir == str(tmp_path / "shared")
    assert loaded.spec.stages[0].steps == 10, "the space's set: still applies"


def test_every_problem_is_named_before_anything_is_written(project, tmp_path):
    with pytest.raises(UserError) as error:
        prepare_submission("run", str(project / "p.yaml"), ["train.lr=0", "stages.0.domain=missing"],
                           "sqlite:///x.db", None, [], tmp_path / "b")
    assert any("train.lr" in p for p in error.value.problems)
    assert any("'missing' is not a domain" in p for p in error.value.problems)
    assert not (tmp_path / "b").exists()


def test_a_harness_columns_task_folder_is_carried_and_its_task_loads_from_the_bundle(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the harness extra: pip install 'hft-ray[harness]'")
    import shutil

    shutil.copytree(ROOT / "tests" / "data" / "harness", tmp_path / "tasks")
    (tmp_path / "p.yaml").write_text("""\
name: carry-harness
model: {source: builtin:tiny-llama}
domains:
  upper: {source: builtin:upper, eval_size: 8}
  upper_mc: {source: {harness: upper_mc, include_path: tasks}}
stages: [{domain: upper, steps: 3}]
methods: {hft: {kind: hft}}
""")
    monkeypatch.chdir(tmp_path)
    bundle = tmp_path / "bundle"
    submission = prepare_submission("run", "p.yaml", [], "sqlite:///mlflow.db", None, [], bundle)
    assert submission.carried == ["tasks"]
    written = yaml.safe_load((bundle / "pipeline.yaml").read_text())
    assert written["domains"]["upper_mc"]["source"]["include_path"] == "carried/upper_mc-tasks"
    shutil.rmtree(tmp_path / "tasks")  # the cluster has the bundle only
    spec, _ = load_spec(bundle / "pipeline.yaml")
    assert prepare(spec, bundle).harness["upper_mc"].include_path == str(bundle / "carried" / "upper_mc-tasks")
